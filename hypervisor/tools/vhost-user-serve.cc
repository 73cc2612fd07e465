// Serves skiff's virtio devices over vhost-user from the command line, without Node: for debugging
// against a hand-started QEMU and for sanitizer runs (test/vhost-user.test.ts builds it with ASan).
//   vhost-user-serve DIR [--disk FILE[,ro]]... [--rng] [--vsock] [--net] [--publish HOST:GUEST[/udp]]...
// --net: virtio-net behind libslirp (needs a build with -DSKIFF_SLIRP -lslirp), MAC
// Net::stableMac("vhost-user-serve"); --publish implies --net.
// Prints one line per socket ("blk DIR/blk0.sock", ..., "net DIR/net.sock"), then "vsock-host
// DIR/vsock" and "net-mac XX:XX:XX:XX:XX:XX" where they apply, then "ready", and serves until
// SIGINT or SIGTERM; device log lines go to stderr.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "devices/virtio/net.h"
#include "transport/device_server.h"
#include "tools/parse_forward.h"

namespace {

const char kUsage[] = "usage: vhost-user-serve DIR [--disk FILE[,ro]]... [--rng] [--vsock] [--net] [--publish HOST:GUEST[/udp]]...\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "%s", kUsage);
    return 2;
  }
  skiff::vhost_user::ServeConfig config;
  config.socketDir = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--rng") {
      config.rng = true;
    } else if (a == "--vsock") {
      config.vsock = true;
    } else if (a == "--net") {
      config.net = true;
    } else if (a == "--publish" && i + 1 < argc) {
      skiff::vhost_user::ServedForward f;
      if (!skiff::tools::parseForward(argv[++i], f)) {
        std::fprintf(stderr, "vhost-user-serve: --publish %s: expected HOST:GUEST or HOST:GUEST/udp, ports 1-65535\n", argv[i]);
        return 2;
      }
      config.net = true;
      config.netForwards.push_back(f);
    } else if (a == "--disk" && i + 1 < argc) {
      std::string d = argv[++i];
      bool ro = d.size() > 3 && d.compare(d.size() - 3, 3, ",ro") == 0;
      if (ro) d.resize(d.size() - 3);
      config.disks.push_back({d, ro, "skiff-disk-" + std::to_string(config.disks.size())});
    } else {
      std::fprintf(stderr, "vhost-user-serve: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (config.net) config.netMac = skiff::virtio::Net::stableMac("vhost-user-serve");
  // Block the signals in every thread (the loop thread inherits the mask) and wait for one here.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  try {
    auto server = skiff::vhost_user::DeviceServer::start(config, [](const std::string& m) { std::fprintf(stderr, "%s\n", m.c_str()); });
    for (const auto& s : server->sockets()) std::printf("%s %s\n", s.kind.c_str(), s.path.c_str());
    if (!server->vsockPath().empty()) std::printf("vsock-host %s\n", server->vsockPath().c_str());
    if (config.net) {
      const auto& m = config.netMac;
      std::printf("net-mac %02x:%02x:%02x:%02x:%02x:%02x\n", m[0], m[1], m[2], m[3], m[4], m[5]);
    }
    std::printf("ready\n");
    std::fflush(stdout);
    int sig = 0;
    sigwait(&set, &sig);
    std::printf("cpu %.6f s\n", server->cpuSeconds());
    server->close();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vhost-user-serve: %s\n", e.what());
    return 1;
  }
  return 0;
}
