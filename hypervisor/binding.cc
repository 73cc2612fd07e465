// The only file that touches Napi values: it converts between JS and the plain C++ core.
// A machine runs on its own native thread; console bytes and the ending come back to JS through
// one thread-safe function, so they arrive in order and the JS thread never blocks.
#include <napi.h>

#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "devices/doorbell_test.h"
#include "devices/virtio/net.h"
#include "probe.h"
#include "transport/device_server.h"
#include "vmm/machine.h"
#include "vmm/virtio_devices.h"

namespace {

Napi::Value Probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  skiff::HostProbe probe = skiff::probeHost();
  Napi::Object result = Napi::Object::New(env);
  result.Set("backend", probe.backend.empty() ? env.Null() : Napi::String::New(env, probe.backend));
  result.Set("apiVersion", Napi::Number::New(env, probe.apiVersion));
  result.Set("error", probe.error.empty() ? env.Null() : Napi::String::New(env, probe.error));
  return result;
}

// What travels from the machine thread to JS: a console chunk, or the ending.
struct Message {
  std::string console;
  std::unique_ptr<skiff::MachineResult> result;
};

const char* kindName(skiff::MachineResult::Kind kind) {
  switch (kind) {
    case skiff::MachineResult::Kind::Exited: return "exited";
    case skiff::MachineResult::Kind::Reset: return "reset";
    case skiff::MachineResult::Kind::Shutdown: return "shutdown";
    case skiff::MachineResult::Kind::Killed: return "killed";
    case skiff::MachineResult::Kind::Error: return "error";
  }
  return "error";
}

// net: {seed: string, forwards: [{hostPort, guestPort, udp}]} (the caller validated the ports;
// they are checked again here only as far as the C++ types need). The MAC is Net::stableMac(seed):
// computed here only, for both engines. False with a JS exception pending when malformed.
bool ParseNet(Napi::Env env, Napi::Value v, skiff::VirtioNet& net, std::string& seed) {
  auto fail = [&](const char* what) {
    Napi::TypeError::New(env, std::string("net: ") + what).ThrowAsJavaScriptException();
    return false;
  };
  if (v.IsUndefined()) return true;
  if (!v.IsObject() || !v.As<Napi::Object>().Get("seed").IsString()) return fail("must be {seed: string, forwards: [...]}");
  Napi::Object o = v.As<Napi::Object>();
  seed = o.Get("seed").As<Napi::String>().Utf8Value();
  net.enabled = true;
  net.mac = skiff::virtio::Net::stableMac(seed);
  Napi::Value list = o.Get("forwards");
  if (list.IsUndefined()) return true;
  if (!list.IsArray()) return fail("forwards must be an array");
  Napi::Array a = list.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value f = a.Get(i);
    if (!f.IsObject()) return fail("forwards[] must be {hostPort, guestPort, udp?}");
    Napi::Value h = f.As<Napi::Object>().Get("hostPort"), g = f.As<Napi::Object>().Get("guestPort"), u = f.As<Napi::Object>().Get("udp");
    if (!h.IsNumber() || !g.IsNumber()) return fail("forwards[] must be {hostPort, guestPort, udp?}");
    double hp = h.As<Napi::Number>().DoubleValue(), gp = g.As<Napi::Number>().DoubleValue();
    if (!(hp >= 1 && hp <= 65535 && gp >= 1 && gp <= 65535)) return fail("forwards[] ports must be 1-65535");
    net.forwards.push_back({u.IsBoolean() && u.As<Napi::Boolean>().Value(), static_cast<uint16_t>(hp), static_cast<uint16_t>(gp)});
  }
  return true;
}

std::string MacText(const std::array<uint8_t, 6>& mac) {
  char text[18];
  std::snprintf(text, sizeof text, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
  return text;
}

class MachineWrap;
void Deliver(Napi::Env env, Napi::Function onConsole, MachineWrap* self, Message* raw);
using MachineTsfn = Napi::TypedThreadSafeFunction<MachineWrap, Message, Deliver>;

class MachineWrap : public Napi::ObjectWrap<MachineWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Machine", {InstanceMethod("start", &MachineWrap::Start), InstanceMethod("kill", &MachineWrap::Kill), InstanceMethod("input", &MachineWrap::Input),
                                       InstanceMethod("guestResidentBytes", &MachineWrap::GuestResidentBytes)});
  }

  explicit MachineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MachineWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsObject()) {
      Napi::TypeError::New(env, "Machine(config): config must be an object").ThrowAsJavaScriptException();
      return;
    }
    Napi::Object o = info[0].As<Napi::Object>();
    auto str = [&](const char* key, bool required) -> std::string {
      Napi::Value v = o.Get(key);
      if (v.IsString()) return v.As<Napi::String>().Utf8Value();
      if (required || !v.IsUndefined()) Napi::TypeError::New(env, std::string("Machine config: ") + key + " must be a string").ThrowAsJavaScriptException();
      return "";
    };
    auto num = [&](const char* key) -> double {
      Napi::Value v = o.Get(key);
      if (!v.IsNumber()) {
        Napi::TypeError::New(env, std::string("Machine config: ") + key + " must be a number").ThrowAsJavaScriptException();
        return 0;
      }
      return v.As<Napi::Number>().DoubleValue();
    };
    config_.kernelPath = str("kernel", true);
    config_.initrdPath = str("initrd", false);
    config_.cmdline = str("cmdline", true);
    double cpus = num("cpus"), mib = num("memoryMiB");
    if (env.IsExceptionPending()) return;
    if (cpus < 1 || cpus > 255 || mib < 1 || mib > 1 << 20) {
      Napi::RangeError::New(env, "Machine config: cpus or memoryMiB out of range").ThrowAsJavaScriptException();
      return;
    }
    config_.cpus = static_cast<uint32_t>(cpus);
    config_.memoryBytes = static_cast<uint64_t>(mib) << 20;
    // Test knobs, not part of a VM's configuration: the doorbell test device (devices/doorbell_test.h),
    // and doing doorbells and interrupt lines in the VMM even where the backend could.
    auto flag = [&](const char* key) {
      Napi::Value v = o.Get(key);
      if (v.IsUndefined()) return false;
      if (!v.IsBoolean()) Napi::TypeError::New(env, std::string("Machine config: ") + key + " must be a boolean").ThrowAsJavaScriptException();
      return v.IsBoolean() && v.As<Napi::Boolean>().Value();
    };
    // virtio devices (vmm/virtio_devices.h): rng: boolean, disks: [{path, readOnly, serial}],
    // vsockDir: string (the VM's private directory for vsock's Unix sockets), net (ParseNet).
    skiff::VirtioConfig virtio;
    virtio.rng = flag("rng");
    Napi::Value disks = o.Get("disks");
    if (!disks.IsUndefined()) {
      if (!disks.IsArray()) {
        Napi::TypeError::New(env, "Machine config: disks must be an array").ThrowAsJavaScriptException();
        return;
      }
      Napi::Array list = disks.As<Napi::Array>();
      for (uint32_t i = 0; i < list.Length(); i++) {
        Napi::Value d = list.Get(i);
        if (!d.IsObject() || !d.As<Napi::Object>().Get("path").IsString()) {
          Napi::TypeError::New(env, "Machine config: disks[] must be {path, readOnly?, serial?}").ThrowAsJavaScriptException();
          return;
        }
        Napi::Object disk = d.As<Napi::Object>();
        Napi::Value ro = disk.Get("readOnly"), serial = disk.Get("serial");
        virtio.disks.push_back({disk.Get("path").As<Napi::String>().Utf8Value(), ro.IsBoolean() && ro.As<Napi::Boolean>().Value(), serial.IsString() ? serial.As<Napi::String>().Utf8Value() : ""});
      }
    }
    virtio.vsockDir = str("vsockDir", false);
    std::string seed;
    if (!ParseNet(env, o.Get("net"), virtio.net, seed)) return;
    if (env.IsExceptionPending()) return;
    if (virtio.rng || !virtio.disks.empty() || !virtio.vsockDir.empty() || virtio.net.enabled) config_.devices.push_back(skiff::attachVirtio(std::move(virtio)));
    if (flag("doorbellTest")) config_.devices.push_back(skiff::attachDoorbellTest);
    config_.emulateDoorbells = flag("emulateDoorbells");
    config_.emulateInterruptLines = flag("emulateInterruptLines");
  }

 private:
  // start(onConsole: (chunk: Buffer) => void): Promise<{kind, status, detail, rip, setupMs, runMs}>
  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (started_) {
      Napi::Error::New(env, "Machine.start: already started").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (info.Length() < 1 || !info[0].IsFunction()) {
      Napi::TypeError::New(env, "Machine.start(onConsole): onConsole must be a function").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    started_ = true;
    deferred_ = std::make_unique<Napi::Promise::Deferred>(env);
    try {
      machine_ = std::make_shared<skiff::Machine>(config_, [this](const uint8_t* data, size_t size) {
        auto* msg = new Message{std::string(reinterpret_cast<const char*>(data), size), nullptr};
        if (tsfn_.NonBlockingCall(msg) != napi_ok) delete msg;
      });
    } catch (const std::exception& e) {  // the OS refused the machine's event loop
      deferred_->Reject(Napi::Error::New(env, e.what()).Value());
      return deferred_->Promise();
    }
    tsfn_ = MachineTsfn::New(env, info[0].As<Napi::Function>(), "skiff-machine", 0, 1, this);
    Ref();  // the wrapper must outlive the machine thread

    // Once the ending is queued, JS may finish and collect this wrapper at any moment: the thread
    // works on its own copies and holds the machine, whose VM it frees after the ending is sent
    // (that takes milliseconds on KVM on PVM: never on the JS thread, never before JS hears).
    std::thread([machine = machine_, tsfn = tsfn_]() mutable {
      auto* msg = new Message{"", std::make_unique<skiff::MachineResult>(machine->run())};
      if (tsfn.BlockingCall(msg) != napi_ok) delete msg;
      machine->shutdown();
      machine.reset();  // the last owner may be this thread: then the machine ends here
      tsfn.Release();
    }).detach();
    return deferred_->Promise();
  }

  friend void Deliver(Napi::Env, Napi::Function, MachineWrap*, Message*);

  void Finish(Napi::Env env, const skiff::MachineResult& r) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("kind", kindName(r.kind));
    o.Set("status", Napi::Number::New(env, r.status));
    o.Set("detail", r.detail);
    o.Set("rip", Napi::BigInt::New(env, static_cast<uint64_t>(r.rip)));
    o.Set("setupMs", r.setupMs);
    o.Set("runMs", r.runMs);
    o.Set("events", r.events);
    deferred_->Resolve(o);
    Unref();
  }

  Napi::Value Kill(const Napi::CallbackInfo& info) {
    if (machine_) machine_->kill();
    return info.Env().Undefined();
  }

  // Host bytes backing guest RAM right now (mincore); 0 before boot and after the end.
  Napi::Value GuestResidentBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), machine_ ? static_cast<double>(machine_->guestResidentBytes()) : 0);
  }

  Napi::Value Input(const Napi::CallbackInfo& info) {
    if (info.Length() >= 1 && info[0].IsBuffer() && machine_) {
      auto buf = info[0].As<Napi::Buffer<uint8_t>>();
      machine_->consoleInput(buf.Data(), buf.Length());
    }
    return info.Env().Undefined();
  }

  skiff::MachineConfig config_;
  bool started_ = false;
  std::shared_ptr<skiff::Machine> machine_;
  std::unique_ptr<Napi::Promise::Deferred> deferred_;
  MachineTsfn tsfn_;
};

void Deliver(Napi::Env env, Napi::Function onConsole, MachineWrap* self, Message* raw) {
  std::unique_ptr<Message> msg(raw);
  if (!env) return;  // the environment is going away
  if (msg->result) {
    self->Finish(env, *msg->result);  // the ending is always the last message
    return;
  }
  onConsole.Call({Napi::Buffer<char>::Copy(env, msg->console.data(), msg->console.size())});
}


// skiff's devices served over vhost-user to a QEMU guest (transport/device_server.h):
// new DeviceServer({socketDir, disks: [{path, readOnly, serial}], rng, vsock, net}) opens the disks,
// starts net's NAT (listening on the --publish ports) and binds the sockets at once (a one-line
// Error if it cannot), then serves on its own native thread.
// .sockets: [{kind, path}], .vsockPath, .netMac, .cpuSeconds(), .close() (waits for the device thread:
// milliseconds). Device log lines (a front-end dropped for breaking the protocol, a device
// failed by its driver) go to stderr, one line each.
class DeviceServerWrap : public Napi::ObjectWrap<DeviceServerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DeviceServer", {InstanceMethod("close", &DeviceServerWrap::Close), InstanceMethod("cpuSeconds", &DeviceServerWrap::CpuSeconds)});
  }

  explicit DeviceServerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceServerWrap>(info) {
    Napi::Env env = info.Env();
    auto typeError = [&](const std::string& what) { Napi::TypeError::New(env, "DeviceServer config: " + what).ThrowAsJavaScriptException(); };
    if (info.Length() < 1 || !info[0].IsObject()) { typeError("must be an object"); return; }
    Napi::Object o = info[0].As<Napi::Object>();
    skiff::vhost_user::ServeConfig config;
    if (!o.Get("socketDir").IsString()) { typeError("socketDir must be a string"); return; }
    config.socketDir = o.Get("socketDir").As<Napi::String>().Utf8Value();
    for (const char* key : {"rng", "vsock"}) {
      Napi::Value v = o.Get(key);
      if (!v.IsUndefined() && !v.IsBoolean()) { typeError(std::string(key) + " must be a boolean"); return; }
    }
    config.rng = o.Get("rng").IsBoolean() && o.Get("rng").As<Napi::Boolean>().Value();
    config.vsock = o.Get("vsock").IsBoolean() && o.Get("vsock").As<Napi::Boolean>().Value();
    skiff::VirtioNet net;
    std::string seed;
    if (!ParseNet(env, o.Get("net"), net, seed)) return;
    config.net = net.enabled;
    config.netMac = net.mac;
    for (const auto& f : net.forwards) config.netForwards.push_back({f.udp, f.hostPort, f.guestPort});
    Napi::Value disks = o.Get("disks");
    if (!disks.IsUndefined()) {
      if (!disks.IsArray()) { typeError("disks must be an array"); return; }
      Napi::Array list = disks.As<Napi::Array>();
      for (uint32_t i = 0; i < list.Length(); i++) {
        Napi::Value d = list.Get(i);
        if (!d.IsObject() || !d.As<Napi::Object>().Get("path").IsString()) { typeError("disks[] must be {path, readOnly?, serial?}"); return; }
        Napi::Object disk = d.As<Napi::Object>();
        Napi::Value ro = disk.Get("readOnly"), serial = disk.Get("serial");
        config.disks.push_back({disk.Get("path").As<Napi::String>().Utf8Value(), ro.IsBoolean() && ro.As<Napi::Boolean>().Value(),
                                serial.IsString() ? serial.As<Napi::String>().Utf8Value() : ""});
      }
    }
    try {
      server_ = skiff::vhost_user::DeviceServer::start(config, [](const std::string& m) { std::fprintf(stderr, "skiff: %s\n", m.c_str()); });
    } catch (const std::exception& e) {
      Napi::Error::New(env, e.what()).ThrowAsJavaScriptException();
      return;
    }
    Napi::Array sockets = Napi::Array::New(env, server_->sockets().size());
    for (size_t i = 0; i < server_->sockets().size(); i++) {
      Napi::Object s = Napi::Object::New(env);
      s.Set("kind", server_->sockets()[i].kind);
      s.Set("path", server_->sockets()[i].path);
      sockets.Set(static_cast<uint32_t>(i), s);
    }
    info.This().As<Napi::Object>().Set("sockets", sockets);
    info.This().As<Napi::Object>().Set("vsockPath", server_->vsockPath());
    // QEMU's virtio-net-device keeps the config space (and so the MAC) itself: it gets this one.
    info.This().As<Napi::Object>().Set("netMac", config.net ? Napi::Value(Napi::String::New(env, MacText(config.netMac))) : env.Null());
  }

 private:
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (server_) server_->close();
    return info.Env().Undefined();
  }
  Napi::Value CpuSeconds(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), server_ ? server_->cpuSeconds() : 0); }

  std::unique_ptr<skiff::vhost_user::DeviceServer> server_;
};

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("probe", Napi::Function::New(env, Probe, "probe"));
  exports.Set("Machine", MachineWrap::Define(env));
  exports.Set("DeviceServer", DeviceServerWrap::Define(env));
  // null, or why this build cannot give a guest a network (no libslirp), for both engines.
  exports.Set("netUnavailable", skiff::netAvailable() ? env.Null() : Napi::String::New(env, skiff::kNoNetMessage));
  return exports;
}

}  // namespace

NODE_API_MODULE(skiff_hypervisor, Init)
