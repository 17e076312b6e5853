// alexnet_classify_openvino [--threads N] [--top-k K] [--json] ENGINE_DIR IMAGE...
// Classifies images with an OpenVINO engine folder (model.xml + model.bin + engine.json) on the
// CPU through OpenVINO's C++ API: one ov::CompiledModel, one ov::InferRequest per thread.
#include <algorithm>
#include <cctype>
#include <openvino/openvino.hpp>
#include <string>

#include "alexnet/classify.hpp"

namespace {

using alexnet::EngineInfo;
using alexnet::UserError;

// The same precision rule as the Python runner (alexnet_deploy/backends/openvino.py): FP32 for
// FP32 and INT8 engines (never the bf16 default of CPUs with AMX), FP16 for FP16 engines where
// the CPU computes in FP16.
ov::element::Type inference_precision(ov::Core& core, const std::string& precision) {
  if (precision == "fp16") {
    const auto caps = core.get_property("CPU", ov::device::capabilities);
    if (std::find(caps.begin(), caps.end(), "FP16") != caps.end()) return ov::element::f16;
  }
  return ov::element::f32;
}

// "2026.4.1-22982-..." -> 2026; 0 when unparseable
int major_version(const std::string& version) {
  std::size_t digits = 0;
  while (digits < version.size() && std::isdigit(static_cast<unsigned char>(version[digits]))) ++digits;
  return digits == 0 || version[digits] != '.' ? 0 : std::stoi(version.substr(0, digits));
}

// IR written by a newer OpenVINO major version is refused, with the Python backend's message
// (alexnet_deploy/backends/openvino.py, OpenVinoBackend.check_compatible).
void check_compatible(const EngineInfo& engine) {
  const std::string here = ov::get_openvino_version().buildNumber;
  if (major_version(engine.backend_version) > major_version(here)) {
    throw UserError("engine was built with OpenVINO " + engine.backend_version +
                    ", newer than the installed " + here +
                    ": upgrade openvino or rebuild the engine here");
  }
}

class OpenVinoSession : public alexnet::Session {
 public:
  OpenVinoSession(ov::CompiledModel& compiled, const EngineInfo& engine)
      : request_(compiled.create_infer_request()), engine_(engine) {}

  void infer(const void* input, int batch, float* logits) override {
    const std::size_t n = static_cast<std::size_t>(batch);
    const std::size_t c = engine_.input_shape[0], h = engine_.input_shape[1],
                      w = engine_.input_shape[2];
    // wraps the caller's buffer: no copy
    ov::Tensor tensor = engine_.uint8_input
                            ? ov::Tensor(ov::element::u8, {n, h, w, c}, const_cast<void*>(input))
                            : ov::Tensor(ov::element::f32, {n, c, h, w}, const_cast<void*>(input));
    request_.set_tensor(engine_.input_name, tensor);
    request_.infer();
    const ov::Tensor out = request_.get_tensor(engine_.output_name);
    const std::size_t expected = static_cast<std::size_t>(batch) * engine_.classes.size();
    if (out.get_element_type() != ov::element::f32 || out.get_size() != expected) {
      throw UserError("engine " + engine_.dir.string() + " returned " +
                      std::to_string(out.get_size()) + " outputs of type " +
                      out.get_element_type().get_type_name() + ", expected " +
                      std::to_string(expected) + " float32 logits: rebuild the engine");
    }
    std::copy_n(out.data<const float>(), expected, logits);
  }

 private:
  ov::InferRequest request_;
  const EngineInfo& engine_;
};

alexnet::SessionFactory load(const EngineInfo& engine, int threads) {
  const std::string xml = engine.artifact("model.xml").string();
  engine.artifact("model.bin");
  check_compatible(engine);
  // Owned by the factory, shared by every session (CompiledModel is thread-safe to create
  // requests from; each request is used by one thread).
  auto compiled = std::make_shared<ov::CompiledModel>();
  try {
    ov::Core core;
    *compiled = core.compile_model(
        core.read_model(xml), "CPU", ov::hint::inference_precision(inference_precision(core, engine.precision)),
        // one CPU stream per worker thread, so the requests run in parallel
        ov::num_streams(threads));
  } catch (const ov::Exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    throw UserError("OpenVINO " + std::string(ov::get_openvino_version().buildNumber) +
                    " cannot load engine " + engine.dir.string() + " (" + what + "): rebuild it");
  }
  return [compiled, &engine] { return std::make_unique<OpenVinoSession>(*compiled, engine); };
}

}  // namespace

int main(int argc, char** argv) { return alexnet::classify_main(argc, argv, "openvino", load); }
