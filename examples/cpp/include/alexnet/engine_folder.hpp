// Reading an alexnet-deploy engine folder: its engine.json sidecar (format
// "alexnet-deploy/engine/1", written by `alexnet-deploy build`; alexnet_deploy/engine.py is the
// definition) and the paths of its artifacts.
#pragma once

#include <array>
#include <filesystem>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace alexnet {

// A problem the user can fix (a bad path, file or engine): the apps print it as one line
// "error: ..." and exit with status 2, like the Python CLI.
class UserError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// How an image becomes one model input (alexnet_deploy/preprocess.py, PreprocessSpec): convert
// to RGB, resize the shorter side to `resize` with Pillow's filter `interpolation`, centre-crop
// `crop` x `crop`, scale to 0..1, subtract `mean`, divide by `std`, lay out as CHW float32.
struct PreprocessSpec {
  int crop = 227;
  int resize = 256;
  std::array<double, 3> mean{0.485, 0.456, 0.406};
  std::array<double, 3> std{0.229, 0.224, 0.225};
  std::string interpolation = "bilinear";
};

// What the C++ apps need from engine.json.
struct EngineInfo {
  std::filesystem::path dir;         // the engine folder
  std::string backend;               // "openvino", "tensorrt", "onnxruntime"
  std::string backend_version;       // the backend's version at build time
  std::string precision;             // fp32 | fp16 | int8 | mixed
  std::string input_name;            // input tensor name
  std::string output_name;           // logits tensor name
  std::array<int, 3> input_shape{};  // (C, H, W) of one input
  bool uint8_input = false;          // input.dtype "uint8": resized, cropped RGB pixels, NHWC
  int min_batch = 1;                 // smallest batch the engine takes
  std::optional<int> max_batch;      // largest; empty for any
  PreprocessSpec preprocess;
  std::vector<std::string> classes;            // class names in logit order
  std::map<std::string, std::string> artifacts;  // file name -> sha256
  std::map<std::string, std::string> host;       // build host: hostname, cpu, gpu, ...

  // The path of artifact `name` in the folder; UserError if the sidecar does not list it or
  // the file is missing.
  std::filesystem::path artifact(const std::string& name) const;
  int input_size() const { return input_shape[0] * input_shape[1] * input_shape[2]; }
  // Bytes of one input as the engine takes it: float32 NCHW, or uint8 NHWC pixels.
  std::size_t input_bytes() const {
    return static_cast<std::size_t>(input_size()) * (uint8_input ? 1 : sizeof(float));
  }
};

// Read and check `path/engine.json` (`path` is the engine folder or its engine.json).
// Throws UserError naming the file and what to do when the folder or sidecar is missing or
// malformed, or when the engine was built for another backend than `expected_backend` (pass ""
// to accept any). Artifact hashes are not re-checked here (the Python loader does that).
EngineInfo read_engine(const std::filesystem::path& path, const std::string& expected_backend);

}  // namespace alexnet
