// alexnet_preprocess ENGINE_DIR OUT.f32 IMAGE...
// Writes the preprocessed input of each image (engine.json's preprocessing), as float32 CHW
// tensors one after another in native byte order, to OUT.f32: a check that the C++
// preprocessing equals the Python one (numpy.fromfile(OUT, numpy.float32)).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <vector>

#include "alexnet/engine_folder.hpp"
#include "alexnet/preprocess.hpp"

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  try {
    if (argc < 4) throw alexnet::UserError("usage: alexnet_preprocess ENGINE_DIR OUT.f32 IMAGE...");
    const alexnet::EngineInfo engine = alexnet::read_engine(argv[1], "");
    const fs::path out = argv[2];
    for (int i = 3; i < argc; ++i) {
      if (fs::exists(out) && fs::equivalent(out, argv[i])) {
        throw alexnet::UserError("output " + out.string() + " is one of the input images: choose another");
      }
    }
    std::vector<float> tensor(engine.input_size());
    const fs::path tmp = out.string() + ".tmp";  // renamed into place only when complete
    {
      std::ofstream file(tmp, std::ios::binary | std::ios::trunc);
      if (!file) throw alexnet::UserError("cannot write " + tmp.string() + ": check the folder");
      for (int i = 3; i < argc; ++i) {
        try {
          alexnet::load_input(argv[i], engine.preprocess, tensor.data());
        } catch (...) {
          file.close();
          fs::remove(tmp);
          throw;
        }
        file.write(reinterpret_cast<const char*>(tensor.data()), tensor.size() * sizeof(float));
      }
      if (!file.flush()) throw alexnet::UserError("cannot write " + tmp.string() + ": disk full?");
    }
    fs::rename(tmp, out);
    return 0;
  } catch (const alexnet::UserError& e) {
    std::cerr << "error: " << e.what() << '\n';
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: unexpected failure: " << e.what() << '\n';
    return 1;
  }
}
