// Decoding JPEG and PNG files into 8-bit RGB pixels equal to Pillow's `Image.open(path)
// .convert("RGB")`, and Pillow's resampling (ImagingResample) ported to C++.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace alexnet {

// An 8-bit RGB image, rows top to bottom, pixels interleaved R, G, B.
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> pixels;  // width * height * 3
};

// Decode a JPEG (libjpeg-turbo, its default ISLOW DCT and fancy upsampling, as Pillow decodes)
// or PNG (libpng) file to RGB as alexnet_deploy.preprocess.open_image does: grayscale replicated
// to three channels, palettes looked up, alpha dropped, 16-bit colour samples cut to their high
// byte (Pillow's RGB;16B), 16-bit grayscale scaled by 1/257 and rounded. EXIF orientation is not
// applied (Pillow's Image.open does not either). Throws UserError naming the file for anything
// else: another format (the Python side also reads BMP and WebP), CMYK JPEG, a corrupt file.
RgbImage decode_image(const std::filesystem::path& path);

// Pillow's resampling filters that resize_pillow implements.
enum class Filter { Bilinear, Bicubic };

// Resize `image` to width x height exactly as Pillow's Image.resize(size, filter) does for an RGB
// image (no box, no reducing_gap): a horizontal then a vertical pass of a separable convolution
// whose support widens by the scale factor when downscaling, with coefficients normalised to
// 22-bit fixed point and results rounded and clipped to 0..255.
RgbImage resize_pillow(const RgbImage& image, int width, int height, Filter filter);

}  // namespace alexnet
