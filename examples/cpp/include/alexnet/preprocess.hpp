// The evaluation transform of alexnet_deploy/preprocess.py (PreprocessSpec.load) in C++.
#pragma once

#include <cstdint>
#include <filesystem>

#include "alexnet/engine_folder.hpp"
#include "alexnet/image.hpp"

namespace alexnet {

// Resize `image` so its shorter side is spec.resize (Python's round-half-even for the longer
// side, never below spec.resize), centre-crop spec.crop x spec.crop, and write the normalised
// CHW float32 tensor, 3 * crop * crop values, to `out`. Float arithmetic follows numpy's:
// float32(pixel) * float32(1/255), minus float32(mean), divided by float32(std).
// Throws UserError for an interpolation other than bilinear or bicubic.
void preprocess(const RgbImage& image, const PreprocessSpec& spec, float* out);

// decode_image(path), then preprocess(). Throws UserError naming the file on a bad image.
void load_input(const std::filesystem::path& path, const PreprocessSpec& spec, float* out);

// The resize and centre crop of preprocess() alone: the crop x crop RGB pixels (HWC uint8), what
// an engine built with `--input uint8-nhwc` takes (it scales and normalises them itself).
RgbImage resize_crop(const RgbImage& image, const PreprocessSpec& spec);

// decode_image(path), then resize_crop(), written to `out` (3 * crop * crop bytes, HWC).
void load_pixels(const std::filesystem::path& path, const PreprocessSpec& spec, std::uint8_t* out);

}  // namespace alexnet
