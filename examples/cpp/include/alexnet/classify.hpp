// What both classify apps share: top-k of the logits, the command line, one inference
// session per worker thread, and printing.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "alexnet/engine_folder.hpp"

namespace alexnet {

// The top classes of one image, like Python's alexnet_deploy Prediction: probabilities are the
// softmax over all logits, computed in double.
struct Prediction {
  std::string source;
  std::vector<int> indices;
  std::vector<std::string> labels;
  std::vector<double> probabilities;
};

// The `k` most probable classes of `logits` (classes.size() values), highest first; ties keep
// the lower index first.
Prediction top_k(const std::string& source, const float* logits,
                 const std::vector<std::string>& classes, int k);

// One inference session: an OpenVINO InferRequest or a TensorRT IExecutionContext with its
// stream and buffers. A session is used by one thread only; the apps create one per thread.
class Session {
 public:
  virtual ~Session() = default;
  // Run `batch` inputs as the engine takes them (batch * info.input_bytes() bytes: float32 NCHW,
  // or uint8 NHWC pixels) and write batch * num_classes logits.
  virtual void infer(const void* input, int batch, float* logits) = 0;
};

// Called once per worker thread, on that thread, to create its session.
using SessionFactory = std::function<std::unique_ptr<Session>()>;

// Called once, after the engine's sidecar is read, with the engine and the number of worker
// threads; returns the factory for the sessions (loading the model once, shared by all).
using Loader = std::function<SessionFactory(const EngineInfo& engine, int threads)>;

// The whole command line of a classify app:
//   PROGRAM [--threads N] [--top-k K] [--json] ENGINE_DIR IMAGE...
// Reads the engine (refusing one built for another backend than `backend`), loads it with
// `loader`, classifies the images on N threads (each with its own session, images taken in turn)
// and prints the predictions in the order given. Returns the exit status: 0, 2 for a user error
// (one line "error: ..." on stderr), 1 for an unexpected failure.
int classify_main(int argc, char** argv, const std::string& backend, const Loader& loader);

}  // namespace alexnet
