// Serves skiff's virtio devices over vhost-user from the command line, without Node: for debugging
// against a hand-started QEMU and for sanitizer runs (test/vhost-user.test.ts builds it with ASan).
//   vhost-user-serve DIR [--disk FILE[,ro]]... [--rng] [--vsock]
// Prints one line per socket ("blk DIR/blk0.sock", ..., "vsock-host DIR/vsock"), then "ready", and
// serves until SIGINT or SIGTERM; device log lines go to stderr.
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "transport/device_server.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: vhost-user-serve DIR [--disk FILE[,ro]]... [--rng] [--vsock]\n");
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
