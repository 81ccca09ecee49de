/* Front of the throw-away capture hook (tests/env/capture-hook; not part of the product). A script
 * cannot see its real argv[0] (the kernel replaces it with the script path) and its shell opens fds
 * of its own, so this tiny static binary records, exactly as nix-daemon handed them over:
 *   $CAPTURE_DIR/argv.<pid>    argv, one argument per line
 *   $CAPTURE_DIR/fds.<pid>     each open fd: number, cloexec flag, open flags (octal), target
 *   $CAPTURE_DIR/status.<pid>  a copy of /proc/self/status (ids, signal masks, capabilities)
 * and then execs hook.sh from its own directory with the same arguments (exec keeps pid, fds and
 * session). It opens its own files close-on-exec and skips the directory fd it lists with. */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static FILE *open_out(const char *dir, const char *what) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s.%ld", dir, what, (long)getpid());
    return fopen(path, "we");
}

static void record(const char *dir, int argc, char **argv) {
    FILE *f = open_out(dir, "argv");
    if (f != NULL) {
        for (int i = 0; i < argc; i++) fprintf(f, "%s\n", argv[i]);
        fclose(f);
    }
    /* List fds before opening the output file, so it does not show up. */
    char lines[64][PATH_MAX + 64];
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL && n < 64) {
            if (e->d_name[0] == '.') continue;
            int fd = atoi(e->d_name);
            if (fd == dirfd(d)) continue;
            char link[PATH_MAX], target[PATH_MAX];
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            ssize_t len = readlink(link, target, sizeof target - 1);
            target[len < 0 ? 0 : len] = '\0';
            int fdflags = fcntl(fd, F_GETFD), flflags = fcntl(fd, F_GETFL);
            snprintf(lines[n++], sizeof lines[0], "%d cloexec=%d flags=0%o %s", fd,
                     (fdflags & FD_CLOEXEC) != 0, (unsigned)flflags, target);
        }
        closedir(d);
    }
    f = open_out(dir, "fds");
    if (f != NULL) {
        for (int i = 0; i < n; i++) fprintf(f, "%s\n", lines[i]);
        fclose(f);
    }
    FILE *in = fopen("/proc/self/status", "re");
    f = open_out(dir, "status");
    if (in != NULL && f != NULL) {
        char buf[4096];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, got, f);
    }
    if (in != NULL) fclose(in);
    if (f != NULL) fclose(f);
}

int main(int argc, char **argv) {
    const char *dir = getenv("CAPTURE_DIR");
    if (dir != NULL) record(dir, argc, argv);
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n < 0) {
        perror("capture-hook: readlink /proc/self/exe");
        return 1;
    }
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL) return 1;
    snprintf(slash + 1, sizeof self - (size_t)(slash + 1 - self), "hook.sh");
    argv[0] = self;
    execv(self, argv);
    perror("capture-hook: exec hook.sh");
    return 1;
}
