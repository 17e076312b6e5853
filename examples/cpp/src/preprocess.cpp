#include "alexnet/preprocess.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace alexnet {

RgbImage resize_crop(const RgbImage& image, const PreprocessSpec& spec) {
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
  RgbImage out;
  out.width = out.height = crop;
  out.pixels.resize(static_cast<std::size_t>(crop) * crop * 3);
  for (int y = 0; y < crop; ++y) {
    std::memcpy(&out.pixels[static_cast<std::size_t>(y) * crop * 3],
                &src->pixels[(static_cast<std::size_t>(y + top) * width + left) * 3],
                static_cast<std::size_t>(crop) * 3);
  }
  return out;
}

void preprocess(const RgbImage& image, const PreprocessSpec& spec, float* out) {
  const RgbImage cropped = resize_crop(image, spec);
  const int crop = spec.crop;
  // numpy's float32 arithmetic: x * float32(1/255), then (x - mean) / std, each rounded to float
  const float to_unit = static_cast<float>(1.0 / 255.0);
  const std::size_t plane = static_cast<std::size_t>(crop) * crop;
  for (int c = 0; c < 3; ++c) {
    const float mean = static_cast<float>(spec.mean[c]);
    const float deviation = static_cast<float>(spec.std[c]);
    float* dst = out + c * plane;
    const std::uint8_t* pixel = &cropped.pixels[c];
    for (std::size_t i = 0; i < plane; ++i) {
      const float unit = static_cast<float>(pixel[3 * i]) * to_unit;
      dst[i] = (unit - mean) / deviation;
    }
  }
}

void load_input(const std::filesystem::path& path, const PreprocessSpec& spec, float* out) {
  preprocess(decode_image(path), spec, out);
}

void load_pixels(const std::filesystem::path& path, const PreprocessSpec& spec, std::uint8_t* out) {
  const RgbImage cropped = resize_crop(decode_image(path), spec);
  std::copy(cropped.pixels.begin(), cropped.pixels.end(), out);
}

}  // namespace alexnet
