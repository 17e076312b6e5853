#include "alexnet/preprocess.hpp"

#include <algorithm>
#include <cmath>

namespace alexnet {

void preprocess(const RgbImage& image, const PreprocessSpec& spec, float* out) {
  Filter filter;
  if (spec.interpolation == "bilinear") {
    filter = Filter::Bilinear;
  } else if (spec.interpolation == "bicubic") {
    filter = Filter::Bicubic;
  } else {
    throw UserError("preprocessing interpolation '" + spec.interpolation +
                    "' is not implemented in C++ (bilinear and bicubic are): export the model " +
                    "with one of those");
  }
  // The shorter side becomes spec.resize; Python's round() rounds halves to even, as nearbyint
  // does in the default rounding mode.
  const double scale = static_cast<double>(spec.resize) / std::min(image.width, image.height);
  const int width = std::max(spec.resize, static_cast<int>(std::nearbyint(image.width * scale)));
  const int height = std::max(spec.resize, static_cast<int>(std::nearbyint(image.height * scale)));
  RgbImage resized;
  const RgbImage* src = &image;
  if (width != image.width || height != image.height) {
    resized = resize_pillow(image, width, height, filter);
    src = &resized;
  }
  const int crop = spec.crop;
  const int left = (width - crop) / 2;
  const int top = (height - crop) / 2;
  // numpy's float32 arithmetic: x * float32(1/255), then (x - mean) / std, each rounded to float
  const float to_unit = static_cast<float>(1.0 / 255.0);
  const std::size_t plane = static_cast<std::size_t>(crop) * crop;
  for (int c = 0; c < 3; ++c) {
    const float mean = static_cast<float>(spec.mean[c]);
    const float deviation = static_cast<float>(spec.std[c]);
    float* dst = out + c * plane;
    for (int y = 0; y < crop; ++y) {
      const std::uint8_t* row =
          &src->pixels[(static_cast<std::size_t>(y + top) * width + left) * 3 + c];
      for (int x = 0; x < crop; ++x) {
        const float unit = static_cast<float>(row[3 * x]) * to_unit;
        dst[static_cast<std::size_t>(y) * crop + x] = (unit - mean) / deviation;
      }
    }
  }
}

void load_input(const std::filesystem::path& path, const PreprocessSpec& spec, float* out) {
  preprocess(decode_image(path), spec, out);
}

}  // namespace alexnet
