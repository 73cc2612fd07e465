// skiff-init: PID 1 of a skiff guest.
//
// It mounts the basic filesystems, prints a ready marker with the guest's uptime, runs the one
// command the host asked for, reaps every orphan while it waits, and ends the guest handing the
// command's exit status back to the host. The host names the command and the ways back on the
// kernel command line (see docs/boot.md):
//
//   skiff.cmd=HEX        the argv, NUL-separated, hex-encoded (survives any quoting)
//   skiff.exit_port=N    an I/O port that ends the VM when a 32-bit status is written to it
//                        (QEMU's isa-debug-exit; the native VMM's exit device)
//
// and, when present, a virtio serial port named "skiff.status" receives "exit N\n" first, because
// isa-debug-exit can only carry 7 bits of status through QEMU's process exit code.
//
// An image built by `skiff build` may carry /etc/skiff/onboot and /etc/skiff/services: one command
// per line, encoded like skiff.cmd. onboot commands run first, in order, and each must succeed;
// services are then started and restarted whenever they end, for as long as the guest runs.
//
// Everything read from the command line is treated as untrusted text: lengths are bounded and a
// malformed value is reported, never acted on.
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/io.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define CMDLINE_MAX 4096
#define MAX_ARGS 256
#define MAX_SERVICES 32
#define COMMANDS_FILE_MAX 65536

static void say(const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
  // Write in one call so the line is not interleaved with the command's own output.
  ssize_t unused = write(2, buf, (size_t)n);
  (void)unused;
}

static void mount_one(const char *src, const char *target, const char *type, unsigned long flags,
                      const char *data) {
  mkdir(target, 0755);
  if (mount(src, target, type, flags, data) != 0 && errno != EBUSY)
    say("skiff-init: mount %s on %s: %s\n", type, target, strerror(errno));
}

static void mount_basics(void) {
  const unsigned long nodev = MS_NOSUID | MS_NODEV | MS_NOEXEC;
  mount_one("proc", "/proc", "proc", nodev, NULL);
  mount_one("sysfs", "/sys", "sysfs", nodev, NULL);
  mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
  mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
  mount_one("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mount_one("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  mount_one("cgroup2", "/sys/fs/cgroup", "cgroup2", nodev, NULL);
}

// The kernel hands PID 1 the console as fds 0-2 only if /dev/console existed in the initramfs.
static void ensure_stdio(void) {
  if (fcntl(2, F_GETFD) != -1) return;
  int fd = open("/dev/console", O_RDWR | O_NOCTTY);
  if (fd < 0) return;
  for (int i = 0; i < 3; i++)
    if (fd != i) dup2(fd, i);
  if (fd > 2) close(fd);
}

static size_t read_file(const char *path, char *buf, size_t cap) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  size_t len = 0;
  while (len + 1 < cap) {
    ssize_t n = read(fd, buf + len, cap - 1 - len);
    if (n <= 0) break;
    len += (size_t)n;
  }
  close(fd);
  buf[len] = 0;
  return len;
}

// Finds "key=" as a whole word in the kernel command line; returns the value's length.
static const char *cmdline_value(const char *cmdline, const char *key, size_t *len) {
  size_t klen = strlen(key);
  for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p += klen) {
    if ((p == cmdline || isspace((unsigned char)p[-1])) && p[klen] == '=') {
      const char *v = p + klen + 1;
      size_t n = 0;
      while (v[n] && !isspace((unsigned char)v[n])) n++;
      *len = n;
      return v;
    }
  }
  return NULL;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Decodes skiff.cmd into argv (pointers into out). Returns argc, or -1 if malformed.
static int decode_cmd(const char *hex, size_t len, char *out, size_t cap, char **argv) {
  if (len % 2 != 0 || len / 2 + 1 > cap) return -1;
  size_t n = len / 2;
  for (size_t i = 0; i < n; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return -1;
    out[i] = (char)(hi << 4 | lo);
  }
  out[n] = 0;
  // Arguments are NUL-terminated, so the decoded bytes must end with a NUL.
  if (n == 0 || out[n - 1] != 0) return -1;
  int argc = 0;
  for (size_t i = 0; i < n; i += strlen(out + i) + 1) {
    if (argc == MAX_ARGS) return -1;
    argv[argc++] = out + i;
  }
  argv[argc] = NULL;
  return argc;
}

static double uptime_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

// The time-stamp counter: under QEMU TCG with -icount shift=0 it counts guest instructions (plus
// warped idle time) since reset, which makes boot cost comparable across machines.
static unsigned long long read_tsc(void) {
#if defined(__x86_64__)
  unsigned lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return (unsigned long long)hi << 32 | lo;
#else
  return 0;
#endif
}

static pid_t spawn(char **argv, int interactive) {
  pid_t pid = fork();
  if (pid != 0) return pid;
  setsid();
  if (interactive) {
    // A shell wants a controlling terminal for job control; /dev/console cannot be one.
    int fd = open("/dev/ttyS0", O_RDWR);
    if (fd >= 0) {
      ioctl(fd, TIOCSCTTY, 1);
      for (int i = 0; i < 3; i++) dup2(fd, i);
      if (fd > 2) close(fd);
    }
  }
  signal(SIGPIPE, SIG_DFL);
  setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
  setenv("HOME", "/root", 1);
  setenv("TERM", "linux", 0);
  chdir("/");
  execvp(argv[0], argv);
  int err = errno;
  say("skiff-init: cannot run '%s': %s\n", argv[0], strerror(err));
  _exit(err == ENOENT ? 127 : 126);
}

// The guest's network, when the VM has a NIC: skiff's virtio-net NATs through libslirp, whose
// fixed plan is guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3. Loopback is always brought up.
#define GUEST_IP "10.0.2.15"
#define GUEST_NETMASK "255.255.255.0"
#define GATEWAY_IP "10.0.2.2"
#define DNS_IP "10.0.2.3"

static int set_inet(int fd, unsigned long request, const char *ifname, const char *addr) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
  struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
  sin->sin_family = AF_INET;
  if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) return -1;
  return ioctl(fd, request, &ifr);
}

static int link_up(int fd, const char *ifname) {
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
  if (ioctl(fd, SIOCGIFFLAGS, &ifr) != 0) return -1;
  ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
  return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

static void setup_network(void) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;  // a kernel without INET: nothing to set up
  if (link_up(fd, "lo") != 0) say("skiff-init: bringing up lo: %s\n", strerror(errno));
  if (access("/sys/class/net/eth0", F_OK) == 0) {
    if (set_inet(fd, SIOCSIFADDR, "eth0", GUEST_IP) != 0 || set_inet(fd, SIOCSIFNETMASK, "eth0", GUEST_NETMASK) != 0 ||
        link_up(fd, "eth0") != 0) {
      say("skiff-init: configuring eth0: %s\n", strerror(errno));
    } else {
      struct rtentry rt;
      memset(&rt, 0, sizeof rt);
      struct sockaddr_in *dst = (struct sockaddr_in *)&rt.rt_dst, *gw = (struct sockaddr_in *)&rt.rt_gateway,
                         *mask = (struct sockaddr_in *)&rt.rt_genmask;
      dst->sin_family = gw->sin_family = mask->sin_family = AF_INET;
      inet_pton(AF_INET, GATEWAY_IP, &gw->sin_addr);
      rt.rt_flags = RTF_UP | RTF_GATEWAY;
      rt.rt_dev = "eth0";
      if (ioctl(fd, SIOCADDRT, &rt) != 0 && errno != EEXIST) say("skiff-init: default route: %s\n", strerror(errno));
      // An image may bring its own resolv.conf; only a missing one is written.
      int rfd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (rfd >= 0) {
        static const char text[] = "nameserver " DNS_IP "\n";
        ssize_t unused = write(rfd, text, sizeof text - 1);
        (void)unused;
        close(rfd);
      }
    }
  }
  close(fd);
}

struct service {
  char **argv;
  pid_t pid;
  double started;
};
static struct service services[MAX_SERVICES];
static int service_count;

static void start_service(struct service *svc) {
  svc->started = uptime_seconds();
  svc->pid = spawn(svc->argv, 0);
}

// A service that ended is started again; one that keeps failing at once is held back a second each
// time, so a broken service cannot take the guest's whole CPU.
static void restart_if_service(pid_t pid, int st) {
  for (int i = 0; i < service_count; i++) {
    if (services[i].pid != pid) continue;
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    say("skiff-init: service %s ended with status %d; restarting it\n", services[i].argv[0], code);
    if (uptime_seconds() - services[i].started < 1.0) sleep(1);
    start_service(&services[i]);
    return;
  }
}

// Waits for the main child while reaping every other process that ends (PID 1's duty) and
// restarting services. With main_pid 0 it waits for as long as the guest runs.
static int wait_for(pid_t main_pid) {
  for (;;) {
    int st;
    pid_t pid = wait(&st);
    if (pid < 0) {
      if (errno == EINTR) continue;
      if (errno == ECHILD && main_pid == 0) {
        pause();
        continue;
      }
      return 125;
    }
    if (pid != main_pid) {
      restart_if_service(pid, st);
      continue;
    }
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  }
}

// Reads a commands file (one skiff.cmd-encoded command per line) into argv arrays. Returns the
// number of commands, or -1 (said) if the file is malformed.
static int read_commands(const char *path, char ***out, int max) {
  static char text[2][COMMANDS_FILE_MAX];
  static int used;
  if (used == 2) return -1;
  char *buf = text[used++];
  size_t len = read_file(path, buf, COMMANDS_FILE_MAX);
  if (len == 0) return 0;
  if (len + 1 >= COMMANDS_FILE_MAX) {
    say("skiff-init: %s is larger than %d bytes\n", path, COMMANDS_FILE_MAX - 2);
    return -1;
  }
  int count = 0;
  for (char *line = buf; *line;) {
    char *nl = strchr(line, '\n');
    size_t n = nl ? (size_t)(nl - line) : strlen(line);
    if (n > 0) {
      if (count == max) {
        say("skiff-init: %s has more than %d commands\n", path, max);
        return -1;
      }
      char *decoded = malloc(n / 2 + 1);
      char **argv = malloc(sizeof(char *) * (MAX_ARGS + 1));
      if (!decoded || !argv || decode_cmd(line, n, decoded, n / 2 + 1, argv) <= 0) {
        say("skiff-init: %s: command %d is malformed\n", path, count + 1);
        return -1;
      }
      out[count++] = argv;
    }
    if (!nl) break;
    line = nl + 1;
  }
  return count;
}

// Runs the image's onboot commands in order and starts its services. Returns 0, or the status to
// end the guest with.
static int run_image_commands(void) {
  static char **onboot[MAX_SERVICES], **svc_argv[MAX_SERVICES];
  int n = read_commands("/etc/skiff/onboot", onboot, MAX_SERVICES);
  if (n < 0) return 125;
  for (int i = 0; i < n; i++) {
    pid_t pid = spawn(onboot[i], 0);
    int status = pid < 0 ? 125 : wait_for(pid);
    if (status != 0) {
      say("skiff-init: onboot command %s failed with status %d\n", onboot[i][0], status);
      return 125;
    }
  }
  int m = read_commands("/etc/skiff/services", svc_argv, MAX_SERVICES);
  if (m < 0) return 125;
  for (int i = 0; i < m; i++) {
    services[i].argv = svc_argv[i];
    start_service(&services[i]);
    service_count = i + 1;
  }
  return 0;
}

static void drain_console(void) {
  tcdrain(1);
  tcdrain(2);
  int fd = open("/dev/ttyS0", O_RDWR | O_NOCTTY | O_NONBLOCK);
  if (fd >= 0) {
    tcdrain(fd);
    close(fd);
  }
}

// Finds the virtio serial port the host named "skiff.status" and writes the status to it.
static void report_to_status_port(int status) {
  DIR *d = opendir("/sys/class/virtio-ports");
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.' || strlen(e->d_name) > 64) continue;
    char path[320], name[64];
    snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
    read_file(path, name, sizeof name);
    if (strcmp(name, "skiff.status\n") != 0 && strcmp(name, "skiff.status") != 0) continue;
    snprintf(path, sizeof path, "/dev/%s", e->d_name);
    int fd = open(path, O_WRONLY | O_NOCTTY);
    if (fd >= 0) {
      char msg[32];
      int n = snprintf(msg, sizeof msg, "exit %d\n", status);
      ssize_t unused = write(fd, msg, (size_t)n);
      (void)unused;
      fsync(fd);
      close(fd);
    }
    break;
  }
  closedir(d);
}

static void report_to_exit_port(const char *cmdline, int status) {
  size_t len;
  const char *v = cmdline_value(cmdline, "skiff.exit_port", &len);
  if (!v) return;
  char num[16];
  if (len == 0 || len >= sizeof num) return;
  memcpy(num, v, len);
  num[len] = 0;
  char *end;
  unsigned long port = strtoul(num, &end, 0);
  if (*end != 0 || port > 0xfffc) return;
  if (ioperm(port, 4, 1) != 0) {
    say("skiff-init: ioperm(0x%lx): %s\n", port, strerror(errno));
    return;
  }
  outl((unsigned)status, (unsigned short)port);
}

static void end_guest(const char *cmdline, int status) {
  drain_console();
  kill(-1, SIGKILL);
  sync();
  report_to_status_port(status);
  report_to_exit_port(cmdline, status);
  // Reached when no exit device ended the VM: reboot=t makes this a triple fault, which ends it.
  reboot(RB_AUTOBOOT);
  for (;;) pause();
}

int main(int argc, char **argv) {
  if (getpid() != 1) {
    fprintf(stderr, "skiff-init: must run as PID 1 of a guest\n");
    return 2;
  }
  ensure_stdio();
  mount_basics();
  ensure_stdio();

  static char cmdline[CMDLINE_MAX], cmdbuf[CMDLINE_MAX];
  static char *cmd_argv[MAX_ARGS + 1];
  read_file("/proc/cmdline", cmdline, sizeof cmdline);

  char **run_argv = NULL;
  int interactive = 0;
  size_t len;
  const char *hex = cmdline_value(cmdline, "skiff.cmd", &len);
  if (hex) {
    if (decode_cmd(hex, len, cmdbuf, sizeof cmdbuf, cmd_argv) <= 0) {
      say("skiff-init: malformed skiff.cmd on the kernel command line\n");
      end_guest(cmdline, 125);
    }
    run_argv = cmd_argv;
  } else if (argc > 1) {
    run_argv = argv + 1;  // arguments after "--" on the kernel command line
  } else {
    static char *shell[] = {"/bin/sh", NULL};
    run_argv = shell;
    interactive = 1;
  }

  setup_network();
  say("skiff-init: ready %.6f %llu\n", uptime_seconds(), read_tsc());
  int failed = run_image_commands();
  if (failed) end_guest(cmdline, failed);
  // An image that runs services and has no shell keeps running them until the host stops it.
  if (interactive && service_count > 0 && access(run_argv[0], X_OK) != 0) {
    wait_for(0);
  }
  pid_t pid = spawn(run_argv, interactive);
  int status = pid < 0 ? 125 : wait_for(pid);
  end_guest(cmdline, status);
  return 0;
}
