// The only file that touches Napi values: it converts between JS and the plain C++ core.
#include <napi.h>

#include "probe.h"

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

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("probe", Napi::Function::New(env, Probe, "probe"));
  return exports;
}

}  // namespace

NODE_API_MODULE(skiff_hypervisor, Init)
