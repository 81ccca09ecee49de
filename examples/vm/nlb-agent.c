/*
 * nlb-agent: the guest half of nix-lazy-builder's snapshot restores, built by make-image into
 * the image as /sbin/nlb-agent (static, one per architecture).
 *
 * Owns: the virtio-serial port named org.nix-lazy-builder.agent, on which the host asks, one
 * line at a time:
 *
 *   ID ping                     -> ID ok pong
 *   ID refresh SEC NSEC HEX     -> ID ok seeded N clock SEC.NSEC
 *
 * `refresh` is what the host sends after every restore of a snapshot, before it calls the
 * builder ready. In this order it:
 *   1. mixes the HEX bytes (fresh randomness from the host, 32 to 256 bytes) into the kernel's
 *      input pool with RNDADDENTROPY, then forces a reseed of the kernel's CRNG with
 *      RNDRESEEDCRNG: every restore of one snapshot would otherwise go on with the same CRNG
 *      key (and the same per-CPU keys and batches), and so hand out the same "random" bytes;
 *   2. sets CLOCK_REALTIME to the host's time SEC.NSEC (the guest's clock stood still while the
 *      snapshot slept).
 * Replies carry the request's ID; failures are `ID error WHAT`.
 *
 * The SSH server needs no restart: dropbear (since 2012.55) mixes fresh bytes from the kernel
 * into its own pool before it forks for each connection it accepts (`seedrandom()` in
 * svr-main.c), so a listener cloned by the snapshot hands every connection accepted after the
 * reseed fresh randomness. The host connects only after `refresh` answered.
 *
 * The channel does not depend on the guest's randomness: it is a byte stream that only the
 * host (a unix socket in the builder's 0700 state directory) can reach. Nothing it receives is
 * run as a command.
 *
 * Must never: run anything it reads from the port, or block for good on the port (replies are
 * dropped when the host went away).
 *
 * usage: nlb-agent   (the init system starts it once and respawns it)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.nix-lazy-builder.agent"
#define MAX_LINE 1024
#define MIN_SEED 32
#define MAX_SEED 256

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("nlb-agent: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static double since(const struct timespec *t0)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - t0->tv_sec) + (double)(now.tv_nsec - t0->tv_nsec) / 1e9;
}

/* ---------------------------------------------------------------------------------------- */
/* The kernel's random generator and clock */

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Mixes `len` bytes into the input pool (crediting them), then reseeds the CRNG from it. */
static const char *reseed(const unsigned char *bytes, int len)
{
	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_SEED];
	} req;
	req.info.entropy_count = len * 8;
	req.info.buf_size = len;
	memcpy(req.buf, bytes, (size_t)len);
	int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	const char *err = NULL;
	if (fd < 0)
		err = "open /dev/urandom";
	else if (ioctl(fd, RNDADDENTROPY, &req.info) != 0)
		err = "RNDADDENTROPY";
	else if (ioctl(fd, RNDRESEEDCRNG) != 0)
		err = "RNDRESEEDCRNG";
	if (fd >= 0)
		close(fd);
	explicit_bzero(&req, sizeof req);
	return err;
}

/* ---------------------------------------------------------------------------------------- */
/* The port */

/* Finds the port's device node by its name in sysfs. */
static int find_port(char *path, size_t size)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while (found < 0 && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[512], name[128];
		snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
		FILE *f = fopen(p, "re");
		if (!f)
			continue;
		if (fgets(name, sizeof name, f)) {
			name[strcspn(name, "\n")] = 0;
			if (strcmp(name, PORT_NAME) == 0) {
				snprintf(path, size, "/dev/%s", e->d_name);
				found = 0;
			}
		}
		fclose(f);
	}
	closedir(d);
	return found;
}

static int port_fd = -1;

static int open_port(void)
{
	char path[300];
	if (find_port(path, sizeof path) != 0)
		return -1;
	int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		say("cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	/* SIGIO when the host connects, disconnects or sends. */
	if (fcntl(fd, F_SETOWN, getpid()) != 0 || fcntl(fd, F_SETFL, O_NONBLOCK | O_ASYNC) != 0) {
		say("cannot set up %s: %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	say("listening on %s", path);
	return fd;
}

/* Writes a reply; drops it if the host does not take it within 2 s. */
static void reply(const char *id, const char *fmt, ...)
{
	char buf[MAX_LINE];
	int n = snprintf(buf, sizeof buf, "%s ", id);
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = (int)sizeof buf - 2;
	buf[n++] = '\n';
	int off = 0;
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while (off < n) {
		ssize_t w = write(port_fd, buf + off, (size_t)(n - off));
		if (w > 0) {
			off += (int)w;
			continue;
		}
		if (w < 0 && errno != EAGAIN && errno != EINTR)
			break;
		if (since(&t0) > 2.0)
			break;
		struct pollfd p = {port_fd, POLLOUT, 0};
		poll(&p, 1, 50);
	}
	if (off < n)
		say("reply to %s dropped: the host is not reading", id);
}

static void handle(char *line)
{
	char *save = NULL;
	char *id = strtok_r(line, " ", &save);
	char *cmd = id ? strtok_r(NULL, " ", &save) : NULL;
	if (!id || !cmd || strlen(id) > 64)
		return;
	if (strcmp(cmd, "ping") == 0) {
		reply(id, "ok pong");
		return;
	}
	if (strcmp(cmd, "refresh") != 0) {
		reply(id, "error unknown command");
		return;
	}
	char *s_sec = strtok_r(NULL, " ", &save);
	char *s_nsec = strtok_r(NULL, " ", &save);
	char *hex = strtok_r(NULL, " ", &save);
	if (!s_sec || !s_nsec || !hex || strtok_r(NULL, " ", &save)) {
		reply(id, "error usage: refresh SEC NSEC HEX");
		return;
	}
	char *end;
	errno = 0;
	long long sec = strtoll(s_sec, &end, 10);
	if (errno || *end || sec <= 0) {
		reply(id, "error bad seconds");
		return;
	}
	long nsec = strtol(s_nsec, &end, 10);
	if (errno || *end || nsec < 0 || nsec > 999999999) {
		reply(id, "error bad nanoseconds");
		return;
	}
	size_t hl = strlen(hex);
	if (hl % 2 || hl / 2 < MIN_SEED || hl / 2 > MAX_SEED) {
		reply(id, "error the seed must be %d to %d bytes of hex", MIN_SEED, MAX_SEED);
		return;
	}
	unsigned char seed[MAX_SEED];
	int len = (int)(hl / 2);
	for (int i = 0; i < len; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			explicit_bzero(seed, sizeof seed);
			reply(id, "error the seed is not hex");
			return;
		}
		seed[i] = (unsigned char)(hi << 4 | lo);
	}
	explicit_bzero(hex, hl);
	const char *err = reseed(seed, len);
	explicit_bzero(seed, sizeof seed);
	if (err) {
		reply(id, "error %s: %s", err, strerror(errno));
		return;
	}
	struct timespec ts = {(time_t)sec, nsec};
	if (clock_settime(CLOCK_REALTIME, &ts) != 0) {
		reply(id, "error clock_settime: %s", strerror(errno));
		return;
	}
	say("refreshed: reseeded with %d host bytes, clock set to %lld.%09ld", len, sec, nsec);
	reply(id, "ok seeded %d clock %lld.%09ld", len, sec, nsec);
}

static void on_signal(int sig)
{
	(void)sig;
}

int main(int argc, char **argv)
{
	(void)argv;
	if (argc != 1) {
		fprintf(stderr, "usage: nlb-agent\n");
		return 2;
	}
	setvbuf(stderr, NULL, _IOLBF, 0);

	/* SIGIO only interrupts the wait below. */
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGIO, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	sigset_t blocked, waiting;
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGIO);
	sigprocmask(SIG_BLOCK, &blocked, &waiting);
	sigdelset(&waiting, SIGIO);

	struct timespec t_start;
	clock_gettime(CLOCK_MONOTONIC, &t_start);

	char buf[MAX_LINE + 1];
	size_t have = 0;
	int discarding = 0; /* inside an over-long line */
	int host_away = 0;  /* the port read end-of-file: wait for SIGIO */
	for (;;) {
		if (port_fd < 0)
			port_fd = open_port();

		/* Look for the port every 100 ms during the first 10 s, then every 10 s. */
		long wait_ms = port_fd >= 0 ? 10000 : (since(&t_start) < 10.0 ? 100 : 10000);
		struct timespec tmo = {wait_ms / 1000, (wait_ms % 1000) * 1000000L};
		struct pollfd p = {port_fd, POLLIN, 0};
		int watch = port_fd >= 0 && !host_away;
		int r = ppoll(&p, watch ? 1 : 0, &tmo, &waiting);
		if (r < 0 && errno == EINTR) {
			host_away = 0; /* SIGIO: the host came, went or wrote; look again */
			continue;
		}
		if (!watch || r <= 0 || !(p.revents & (POLLIN | POLLHUP | POLLERR)))
			continue;
		ssize_t n = read(port_fd, buf + have, MAX_LINE - have);
		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				say("read: %s", strerror(errno));
			continue;
		}
		if (n == 0) {
			/* The host is not connected (a half line it sent is void). */
			host_away = 1;
			have = 0;
			discarding = 0;
			continue;
		}
		have += (size_t)n;
		for (;;) {
			char *nl = memchr(buf, '\n', have);
			if (!nl) {
				if (have == MAX_LINE) {
					have = 0;
					discarding = 1;
				}
				break;
			}
			*nl = 0;
			if (!discarding) {
				size_t l = (size_t)(nl - buf);
				if (l && buf[l - 1] == '\r')
					buf[l - 1] = 0;
				handle(buf);
			}
			discarding = 0;
			size_t used = (size_t)(nl - buf) + 1;
			memmove(buf, nl + 1, have - used);
			have -= used;
		}
	}
}
