// alexnet_classify_tensorrt [--threads N] [--top-k K] [--json] ENGINE_DIR IMAGE...
// Classifies images with a TensorRT engine folder (model.engine + engine.json) on GPU 0 through
// TensorRT's C++ API: one ICudaEngine; per thread one IExecutionContext, CUDA stream, pinned
// host buffers and device buffers, run with enqueueV3.
//
// Compiled against the TensorRT 10.16 and 11.x headers only: it has not run, because no machine
// this project was developed on has an NVIDIA GPU or TensorRT's libraries.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "alexnet/classify.hpp"

namespace {

using alexnet::EngineInfo;
using alexnet::UserError;

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw UserError(std::string("CUDA ") + what + " failed (" + cudaGetErrorString(status) +
                    "): is there an NVIDIA GPU and driver?");
  }
}

// TensorRT's log: warnings and errors to stderr.
class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << message << '\n';
  }
};

// "10.16.0.72": the library's major.minor.patch.build, as the Python bindings' __version__
// (and so the sidecar's backend version) spells it.
std::string tensorrt_version() {
  return std::to_string(getInferLibMajorVersion()) + "." + std::to_string(getInferLibMinorVersion()) +
         "." + std::to_string(getInferLibPatchVersion()) + "." + std::to_string(getInferLibBuildVersion());
}

// Refuse a plan this machine cannot load, with the Python backend's messages
// (alexnet_deploy/backends/tensorrt.py, TensorRtBackend.check_compatible).
void check_compatible(const EngineInfo& engine) {
  const std::string here = tensorrt_version();
  if (engine.backend_version != here) {
    throw UserError("engine was built with TensorRT " + engine.backend_version +
                    "; this machine has TensorRT " + here +
                    ", and TensorRT plans only load in the exact version that built them: "
                    "rebuild the engine here");
  }
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  const std::string here_cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  const auto built_cc = engine.host.find("gpu_compute_capability");
  if (built_cc != engine.host.end() && !built_cc->second.empty() && built_cc->second != here_cc) {
    const auto gpu = engine.host.find("gpu");
    throw UserError("engine was built for a GPU of compute capability " + built_cc->second + " (" +
                    (gpu == engine.host.end() ? std::string("?") : gpu->second) +
                    "); this GPU is " + here_cc + ": rebuild the engine here");
  }
}

// What every session shares: the runtime and the deserialized engine (the runtime must outlive
// the engine, and the engine every context).
struct Plan {
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::string input, output;  // tensor names
  int max_batch = 1;          // the optimization profile's largest batch
};

class TensorRtSession : public alexnet::Session {
 public:
  TensorRtSession(std::shared_ptr<Plan> plan, const EngineInfo& info)
      : plan_(std::move(plan)), in_bytes_(info.input_bytes()),
        out_size_(static_cast<int>(info.classes.size())) {
    context_.reset(plan_->engine->createExecutionContext());
    if (!context_) throw UserError("TensorRT could not create an execution context (its log above says why)");
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
    const std::size_t in_bytes = in_bytes_ * plan_->max_batch;
    const std::size_t out_bytes = sizeof(float) * out_size_ * plan_->max_batch;
    void* pinned = nullptr;  // page-locked host memory, so the copies can run asynchronously
    check_cuda(cudaMallocHost(&pinned, in_bytes), "cudaMallocHost");
    host_in_ = static_cast<std::uint8_t*>(pinned);
    check_cuda(cudaMallocHost(&pinned, out_bytes), "cudaMallocHost");
    host_out_ = static_cast<float*>(pinned);
    check_cuda(cudaMalloc(&device_in_, in_bytes), "cudaMalloc");
    check_cuda(cudaMalloc(&device_out_, out_bytes), "cudaMalloc");
    if (!context_->setTensorAddress(plan_->input.c_str(), device_in_) ||
        !context_->setTensorAddress(plan_->output.c_str(), device_out_)) {
      throw UserError("TensorRT rejected the buffer addresses (its log above says why)");
    }
  }

  ~TensorRtSession() override {
    context_.reset();  // before its buffers and stream go
    cudaFree(device_in_);
    cudaFree(device_out_);
    cudaFreeHost(host_in_);
    cudaFreeHost(host_out_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  void infer(const void* input, int batch, float* logits) override {
    if (batch > plan_->max_batch) {
      throw UserError("batch size " + std::to_string(batch) + " is outside this engine's profile (1.." +
                      std::to_string(plan_->max_batch) + "); rebuild it with a wider profile");
    }
    const std::size_t in_count = in_bytes_ * batch;  // bytes: float32 NCHW or uint8 NHWC
    const std::size_t out_count = static_cast<std::size_t>(out_size_) * batch;
    std::copy_n(static_cast<const std::uint8_t*>(input), in_count, host_in_);
    nvinfer1::Dims shape = plan_->engine->getTensorShape(plan_->input.c_str());
    shape.d[0] = batch;
    check_cuda(cudaMemcpyAsync(device_in_, host_in_, in_count, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync");
    if (!context_->setInputShape(plan_->input.c_str(), shape)) {
      throw UserError("TensorRT rejected input batch " + std::to_string(batch));
    }
    if (!context_->enqueueV3(stream_)) throw UserError("TensorRT failed to run the engine (its log above says why)");
    check_cuda(cudaMemcpyAsync(host_out_, device_out_, out_count * sizeof(float), cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    std::copy_n(host_out_, out_count, logits);
  }

 private:
  std::shared_ptr<Plan> plan_;
  std::size_t in_bytes_;
  int out_size_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  std::uint8_t* host_in_ = nullptr;
  float* host_out_ = nullptr;
  void* device_in_ = nullptr;
  void* device_out_ = nullptr;
};

alexnet::SessionFactory load(const EngineInfo& info, int /*threads*/) {
  const auto path = info.artifact("model.engine");
  check_compatible(info);
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (!file.good() && !file.eof()) throw UserError("cannot read engine file " + path.string());
  auto plan = std::make_shared<Plan>();
  plan->runtime.reset(nvinfer1::createInferRuntime(plan->logger));
  if (!plan->runtime) throw UserError("cannot create the TensorRT runtime (its log above says why)");
  plan->engine.reset(plan->runtime->deserializeCudaEngine(bytes.data(), bytes.size()));
  if (!plan->engine) {
    throw UserError("TensorRT could not deserialize the engine (its log above says why): rebuild it "
                    "on this machine");
  }
  for (int i = 0; i < plan->engine->getNbIOTensors(); ++i) {
    const char* name = plan->engine->getIOTensorName(i);
    const bool is_input = plan->engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
    // the sidecar's input type (uint8 pixels for a `--input uint8-nhwc` engine); float32 logits
    const nvinfer1::DataType want =
        is_input && info.uint8_input ? nvinfer1::DataType::kUINT8 : nvinfer1::DataType::kFLOAT;
    if (plan->engine->getTensorDataType(name) != want) {
      throw UserError(std::string("engine tensor ") + name + " is not " +
                      (want == nvinfer1::DataType::kUINT8 ? "uint8" : "float32") +
                      " as its sidecar says: rebuild the engine");
    }
    (is_input ? plan->input : plan->output) = name;
  }
  if (plan->input != info.input_name || plan->output != info.output_name) {
    throw UserError("engine file " + path.string() + " has tensors " + plan->input + " -> " + plan->output +
                    ", its sidecar says " + info.input_name + " -> " + info.output_name + ": rebuild it");
  }
  plan->max_batch = plan->engine->getProfileShape(plan->input.c_str(), 0, nvinfer1::OptProfileSelector::kMAX).d[0];
  return [plan, &info] { return std::make_unique<TensorRtSession>(plan, info); };
}

}  // namespace

int main(int argc, char** argv) { return alexnet::classify_main(argc, argv, "tensorrt", load); }
