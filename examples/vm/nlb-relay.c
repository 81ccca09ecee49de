/*
 * nlb-relay: reach the guest's running nix-daemon from an SSH session, without starting Nix.
 * Built by make-image into the image as /sbin/nlb-relay (static, one per architecture).
 *
 * A builder with `uri = "ssh-ng://root@127.0.0.1?remote-program=/sbin/nlb-relay"` has
 * nix-lazy-builder run, over SSH:
 *
 *   nlb-relay --stdio     copy stdin to the daemon's socket and the socket to stdout, until
 *                         both ends are done (the worker protocol, unchanged);
 *   nlb-relay --version   the worker handshake with the daemon, then print
 *                         "nix-daemon (Nix) VERSION" as the daemon said it (the readiness
 *                         check's "the remote Nix answers").
 *
 * Why: under emulation (QEMU TCG) starting any Nix program costs most of a second, dynamic
 * linking included (measured 0.55-0.83 s for `nix-store --version` after a restore, on every
 * run, not only the first). `nix-daemon` started at boot (inittab) is already running in a
 * restored snapshot; a connection to it forks that process, nothing is loaded. The daemon sees
 * the relay's uid (root, as SSH logged in), so it trusts the client as `nix-daemon --stdio`
 * would be trusted.
 *
 * The socket is NIX_DAEMON_SOCKET_PATH, else /nix/var/nix/daemon-socket/socket.
 *
 * Must never: interpret or change the bytes it relays (beyond --version's own handshake), or
 * keep running once both directions are closed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define WORKER_MAGIC_1 0x6e697863u
#define WORKER_MAGIC_2 0x6478696fu
#define STDERR_LAST 0x616c7473u
/* The client's protocol version for --version: 1.33 is the first that hears the daemon's
 * Nix version. */
#define CLIENT_VERSION ((1u << 8) | 33u)

static int connect_daemon(void)
{
	const char *path = getenv("NIX_DAEMON_SOCKET_PATH");
	if (!path || !*path)
		path = "/nix/var/nix/daemon-socket/socket";
	struct sockaddr_un a;
	memset(&a, 0, sizeof a);
	a.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof a.sun_path) {
		fprintf(stderr, "nlb-relay: socket path too long: %s\n", path);
		return -1;
	}
	strcpy(a.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
		fprintf(stderr, "nlb-relay: cannot connect to the nix-daemon at %s: %s\n", path,
			strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static int write_all(int fd, const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

/* The worker protocol's integers: 64 bits, little-endian. */
static int put_u64(int fd, uint64_t v)
{
	unsigned char b[8];
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	return write_all(fd, b, 8);
}

static int get_u64(int fd, uint64_t *v)
{
	unsigned char b[8];
	if (read_all(fd, b, 8))
		return -1;
	*v = 0;
	for (int i = 7; i >= 0; i--)
		*v = (*v << 8) | b[i];
	return 0;
}

static int version(void)
{
	int fd = connect_daemon();
	if (fd < 0)
		return 1;
	uint64_t magic, server, last;
	if (put_u64(fd, WORKER_MAGIC_1) || get_u64(fd, &magic) || magic != WORKER_MAGIC_2 ||
	    get_u64(fd, &server)) {
		fprintf(stderr, "nlb-relay: the daemon did not answer the worker handshake\n");
		return 1;
	}
	if ((server >> 8) != 1 || (server & 0xff) < 33) {
		printf("nix-daemon (worker protocol %u.%u)\n", (unsigned)(server >> 8) & 0xff,
		       (unsigned)server & 0xff);
		return 0;
	}
	/* Our version, no CPU affinity, no reserved space; then the daemon's Nix version. */
	uint64_t len;
	char text[256];
	if (put_u64(fd, CLIENT_VERSION) || put_u64(fd, 0) || put_u64(fd, 0) || get_u64(fd, &len) ||
	    len >= sizeof text || read_all(fd, text, (size_t)((len + 7) & ~(uint64_t)7)) ||
	    get_u64(fd, &last) || last != STDERR_LAST) {
		fprintf(stderr, "nlb-relay: the daemon's handshake was cut short\n");
		return 1;
	}
	text[len] = 0;
	printf("nix-daemon (Nix) %s\n", text);
	close(fd);
	return 0;
}

/* Copies stdin to the socket and the socket to stdout; returns when the socket closed. */
static int relay(void)
{
	int fd = connect_daemon();
	if (fd < 0)
		return 1;
	signal(SIGPIPE, SIG_IGN);
	static char buf[2][65536];
	int in_open = 1;
	for (;;) {
		struct pollfd p[2] = {{in_open ? 0 : -1, POLLIN, 0}, {fd, POLLIN, 0}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (in_open && (p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
			ssize_t n = read(0, buf[0], sizeof buf[0]);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				in_open = 0;
				shutdown(fd, SHUT_WR);
			} else if (write_all(fd, buf[0], (size_t)n)) {
				return 1;
			}
		}
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = read(fd, buf[1], sizeof buf[1]);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return 0;
			if (write_all(1, buf[1], (size_t)n))
				return 1;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "--version"))
		return version();
	if (argc == 2 && !strcmp(argv[1], "--stdio"))
		return relay();
	fprintf(stderr, "usage: nlb-relay --stdio | --version\n");
	return 2;
}
