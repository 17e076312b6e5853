#include "alexnet/engine_folder.hpp"

#include <fstream>
#include <nlohmann/json.hpp>

namespace alexnet {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "alexnet-deploy/engine/1";
constexpr const char* kSidecar = "engine.json";

// A field that parses as JSON but has the wrong shape.
struct Malformed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::array<double, 3> three(const json& values) {
  if (!values.is_array() || values.size() != 3) throw Malformed("mean and std need 3 values");
  return {values[0].get<double>(), values[1].get<double>(), values[2].get<double>()};
}

}  // namespace

fs::path EngineInfo::artifact(const std::string& name) const {
  if (artifacts.count(name) == 0) {
    throw UserError((dir / kSidecar).string() + " lists no " + name + " (the engine is for " +
                    backend + "): rebuild the engine");
  }
  fs::path path = dir / name;
  if (!fs::is_regular_file(path)) {
    throw UserError("engine file " + path.string() +
                    " is missing: the folder is incomplete; rebuild it");
  }
  return path;
}

EngineInfo read_engine(const fs::path& path, const std::string& expected_backend) {
  fs::path dir = path;
  if (fs::is_regular_file(dir) && dir.filename() == kSidecar) dir = dir.parent_path();
  if (!fs::exists(dir)) {
    throw UserError("engine " + dir.string() +
                    " does not exist: build one with 'alexnet-deploy build --model MODEL.onnx "
                    "--precision fp32 --out engines/NAME'");
  }
  const fs::path sidecar = dir / kSidecar;
  if (!fs::is_directory(dir) || !fs::is_regular_file(sidecar)) {
    throw UserError(dir.string() + " is not an engine folder (no engine.json in it): pass the " +
                    "folder written by 'alexnet-deploy build --out engines/NAME'");
  }
  json d;
  try {
    std::ifstream in(sidecar);
    d = json::parse(in);
  } catch (const json::exception& e) {
    throw UserError(sidecar.string() + " is not valid JSON (" + e.what() + "): rebuild the engine");
  }
  if (!d.is_object() || d.value("format", "") != kFormat) {
    throw UserError(sidecar.string() + " is not an alexnet-deploy engine sidecar (expected format " +
                    kFormat + "): rebuild the engine with 'alexnet-deploy build'");
  }
  EngineInfo info;
  info.dir = dir;
  try {
    info.backend = d.at("backend").at("name").get<std::string>();
    info.backend_version = d.at("backend").at("version").get<std::string>();
    info.precision = d.at("precision").get<std::string>();
    const json& input = d.at("input");
    info.input_name = input.at("name").get<std::string>();
    const json& shape = input.at("shape");
    if (!shape.is_array() || shape.size() != 3) throw Malformed("input.shape needs (C, H, W)");
    for (int i = 0; i < 3; ++i) info.input_shape[i] = shape[i].get<int>();
    const std::string dtype = input.at("dtype").get<std::string>();
    const std::string layout = input.value("layout", "NCHW");
    if (dtype == "uint8" && layout == "NHWC") {
      info.uint8_input = true;
    } else if (dtype != "float32" || layout != "NCHW") {
      throw Malformed("input is " + dtype + " " + layout + ", not float32 NCHW or uint8 NHWC");
    }
    info.min_batch = input.value("min_batch", 1);
    if (input.contains("max_batch") && !input["max_batch"].is_null()) {
      info.max_batch = input["max_batch"].get<int>();
    }
    info.output_name = d.contains("output") ? d["output"].value("name", "logits") : "logits";
    const json& pre = d.at("preprocess");
    info.preprocess.crop = pre.at("crop").get<int>();
    info.preprocess.resize = pre.at("resize").get<int>();
    if (pre.contains("mean")) info.preprocess.mean = three(pre["mean"]);
    if (pre.contains("std")) info.preprocess.std = three(pre["std"]);
    info.preprocess.interpolation = pre.value("interpolation", "bilinear");
    if (pre.value("channel_order", "RGB") != "RGB" || pre.value("layout", "NCHW") != "NCHW") {
      throw Malformed("preprocess: only RGB/NCHW is supported");
    }
    info.classes = d.at("classes").get<std::vector<std::string>>();
    info.artifacts = d.at("artifacts").get<std::map<std::string, std::string>>();
    if (d.contains("build") && d["build"].contains("host")) {
      for (const auto& [key, value] : d["build"]["host"].items()) {
        info.host[key] = value.is_string() ? value.get<std::string>() : value.dump();
      }
    }
  } catch (const std::exception& e) {  // json::exception or Malformed
    throw UserError(sidecar.string() + " is missing or has a malformed field (" + e.what() +
                    "): rebuild the engine");
  }
  if (info.input_shape[0] != 3 || info.input_shape[1] != info.preprocess.crop ||
      info.input_shape[2] != info.preprocess.crop || info.classes.empty() ||
      info.preprocess.resize < info.preprocess.crop || info.min_batch < 1) {
    throw UserError(sidecar.string() + ": input shape, preprocessing crop and classes disagree; " +
                    "rebuild the engine");
  }
  if (!expected_backend.empty() && info.backend != expected_backend) {
    throw UserError("engine " + dir.string() + " was built for " + info.backend + "; this program runs " +
                    expected_backend + " engines: build one with 'alexnet-deploy build --backend " +
                    expected_backend + "'");
  }
  return info;
}

}  // namespace alexnet
