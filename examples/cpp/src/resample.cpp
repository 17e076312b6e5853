// Pillow's resampling (src/libImaging/Resample.c, ImagingResample for 8-bit images), ported:
// the same filters, coefficient bounds, 22-bit fixed-point coefficients, rounding and clipping,
// and the same two passes (horizontal over the rows the vertical pass needs, then vertical), so
// that results equal Pillow's bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "alexnet/image.hpp"

namespace alexnet {
namespace {

// Room for 8 bits of result plus the overshoot of negative filter lobes in a 32-bit int.
constexpr int kPrecisionBits = 32 - 8 - 2;

double bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic(double x) {  // Keys' cubic convolution with a = -0.5, as Pillow
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// For each output position, the first input index, how many inputs it reads, and their
// fixed-point weights (`taps` per output, unused ones zero).
struct Coefficients {
  int taps = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<std::int32_t> weights;
};

Coefficients coefficients(int in_size, int out_size, Filter filter) {
  double (*kernel)(double) = filter == Filter::Bilinear ? bilinear : bicubic;
  const double kernel_support = filter == Filter::Bilinear ? 1.0 : 2.0;
  // Downscaling widens the filter by the scale so every input pixel contributes (antialiasing).
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);
  const double support = kernel_support * filter_scale;
  Coefficients c;
  c.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<std::size_t>(out_size) * c.taps, 0);
  std::vector<double> w(c.taps);
  const double inverse_scale = 1.0 / filter_scale;  // multiplied, not divided, as Pillow does
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    // (int) truncates toward zero like Pillow's cast; the clamps keep indices inside the input
    const int lo = std::max(static_cast<int>(center - support + 0.5), 0);
    const int hi = std::min(static_cast<int>(center + support + 0.5), in_size);
    const int n = hi - lo;
    double sum = 0.0;
    for (int k = 0; k < n; ++k) {
      w[k] = kernel((k + lo - center + 0.5) * inverse_scale);
      sum += w[k];
    }
    for (int k = 0; k < n; ++k) {
      const double v = sum != 0.0 ? w[k] / sum : w[k];
      const double fixed = v * (1 << kPrecisionBits);
      c.weights[static_cast<std::size_t>(i) * c.taps + k] =
          static_cast<std::int32_t>(v < 0 ? fixed - 0.5 : fixed + 0.5);
    }
    c.first[i] = lo;
    c.count[i] = n;
  }
  return c;
}

// Round the fixed-point sum (it started at one half) and clip to 0..255.
inline std::uint8_t clip8(std::int32_t sum) {
  return static_cast<std::uint8_t>(std::clamp(sum >> kPrecisionBits, 0, 255));
}

}  // namespace

RgbImage resize_pillow(const RgbImage& image, int width, int height, Filter filter) {
  const Coefficients cv = coefficients(image.height, height, filter);
  const int row0 = cv.first.front();  // the input rows the vertical pass reads
  const int row1 = cv.first.back() + cv.count.back();
  const std::int32_t half = 1 << (kPrecisionBits - 1);

  // Horizontal pass, only over rows row0..row1 (Pillow skips it when the width is unchanged)
  RgbImage tmp;
  const RgbImage* src = &image;
  int src_row0 = 0;
  if (width != image.width) {
    const Coefficients ch = coefficients(image.width, width, filter);
    tmp.width = width;
    tmp.height = row1 - row0;
    tmp.pixels.resize(static_cast<std::size_t>(tmp.width) * tmp.height * 3);
    for (int y = 0; y < tmp.height; ++y) {
      const std::uint8_t* in = &image.pixels[static_cast<std::size_t>(y + row0) * image.width * 3];
      std::uint8_t* out = &tmp.pixels[static_cast<std::size_t>(y) * width * 3];
      for (int x = 0; x < width; ++x) {
        const std::int32_t* k = &ch.weights[static_cast<std::size_t>(x) * ch.taps];
        const std::uint8_t* p = in + static_cast<std::size_t>(ch.first[x]) * 3;
        std::int32_t r = half, g = half, b = half;
        for (int t = 0; t < ch.count[x]; ++t) {
          r += p[3 * t] * k[t];
          g += p[3 * t + 1] * k[t];
          b += p[3 * t + 2] * k[t];
        }
        out[3 * x] = clip8(r);
        out[3 * x + 1] = clip8(g);
        out[3 * x + 2] = clip8(b);
      }
    }
    src = &tmp;
    src_row0 = row0;
  }
  if (height == image.height) return src == &tmp ? tmp : image;

  // Vertical pass
  RgbImage out;
  out.width = width;
  out.height = height;
  out.pixels.resize(static_cast<std::size_t>(width) * height * 3);
  const std::size_t stride = static_cast<std::size_t>(width) * 3;
  for (int y = 0; y < height; ++y) {
    const std::int32_t* k = &cv.weights[static_cast<std::size_t>(y) * cv.taps];
    const std::uint8_t* in = &src->pixels[static_cast<std::size_t>(cv.first[y] - src_row0) * stride];
    std::uint8_t* row = &out.pixels[static_cast<std::size_t>(y) * stride];
    for (std::size_t x = 0; x < stride; ++x) {
      std::int32_t sum = half;
      for (int t = 0; t < cv.count[y]; ++t) sum += in[t * stride + x] * k[t];
      row[x] = clip8(sum);
    }
  }
  return out;
}

}  // namespace alexnet
