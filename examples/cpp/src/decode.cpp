// JPEG and PNG decoding to RGB, matching Pillow's Image.open(path).convert("RGB").
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

// jpeglib.h needs size_t and FILE declared first
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "alexnet/engine_folder.hpp"
#include "alexnet/image.hpp"

namespace alexnet {
namespace fs = std::filesystem;

namespace {

using File = std::unique_ptr<FILE, int (*)(FILE*)>;

File open_file(const fs::path& path) {
  File file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) {
    throw UserError("cannot read image " + path.string() + " (" + std::strerror(errno) +
                    "): check the path");
  }
  return file;
}

// ---- JPEG (libjpeg-turbo) ----
// libjpeg reports fatal errors through error_exit, which must not return: jump back to
// decode_jpeg with the message (C++ exceptions must not cross libjpeg's C frames).
struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Warnings (e.g. extraneous bytes) are not printed, except that a truncated file is an error,
// as in Pillow (libjpeg would pad it with grey and carry on)
void jpeg_warning(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_fail(cinfo);
}

RgbImage decode_jpeg(FILE* file, const fs::path& path) {
  // Everything with a destructor lives before setjmp, so longjmp skips none
  RgbImage image;
  std::vector<std::uint8_t> gray;
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  err.mgr.emit_message = jpeg_warning;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw UserError("cannot decode JPEG image " + path.string() + " (" + err.message +
                    "): the file is corrupt or truncated");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, file);
  jpeg_read_header(&cinfo, TRUE);
  // Pillow opens grayscale JPEGs as mode L and YCbCr/RGB ones as RGB; it keeps libjpeg's
  // defaults (JDCT_ISLOW, fancy upsampling), and so does this decoder.
  const bool grayscale = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    throw UserError("image " + path.string() +
                    " is a CMYK JPEG, which this example does not convert: save it as RGB");
  }
  cinfo.out_color_space = grayscale ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  image.width = static_cast<int>(cinfo.output_width);
  image.height = static_cast<int>(cinfo.output_height);
  image.pixels.resize(static_cast<std::size_t>(image.width) * image.height * 3);
  gray.resize(grayscale ? image.width : 0);
  while (cinfo.output_scanline < cinfo.output_height) {
    std::uint8_t* row = &image.pixels[static_cast<std::size_t>(cinfo.output_scanline) * image.width * 3];
    JSAMPROW rows[1] = {grayscale ? gray.data() : row};
    jpeg_read_scanlines(&cinfo, rows, 1);
    if (grayscale) {  // Pillow's L -> RGB conversion: R = G = B = L
      for (int x = 0; x < image.width; ++x) row[3 * x] = row[3 * x + 1] = row[3 * x + 2] = gray[x];
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return image;
}

// ---- PNG (libpng) ----
struct PngError {
  std::jmp_buf jump;
  char message[256] = "";
};

void png_fail(png_structp png, png_const_charp message) {
  auto* err = static_cast<PngError*>(png_get_error_ptr(png));
  std::snprintf(err->message, sizeof err->message, "%s", message);
  std::longjmp(err->jump, 1);
}

void png_quiet(png_structp, png_const_charp) {}

RgbImage decode_png(FILE* file, const fs::path& path) {
  // Everything with a destructor lives before setjmp, so longjmp skips none
  RgbImage image;
  std::vector<png_bytep> rows;
  std::vector<png_byte> samples;  // 16-bit grayscale only
  PngError err;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &err, png_fail, png_quiet);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw std::bad_alloc();
  }
  if (setjmp(err.jump)) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw UserError("cannot decode PNG image " + path.string() + " (" + err.message +
                    "): the file is corrupt or truncated");
  }
  png_init_io(png, file);
  png_read_info(png, info);
  const int color = png_get_color_type(png, info);
  const int depth = png_get_bit_depth(png, info);
  if (depth == 16 && color == PNG_COLOR_TYPE_GRAY) {
    // Pillow opens these as mode I;16; alexnet_deploy.preprocess.to_rgb scales them to 8 bits,
    // (v + 128) // 257, rather than letting convert("RGB") clip them
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    image.width = static_cast<int>(png_get_image_width(png, info));
    image.height = static_cast<int>(png_get_image_height(png, info));
    samples.resize(static_cast<std::size_t>(image.width) * image.height * 2);
    rows.resize(image.height);
    for (int y = 0; y < image.height; ++y) rows[y] = &samples[static_cast<std::size_t>(y) * image.width * 2];
    png_read_image(png, rows.data());
    png_read_end(png, nullptr);
    png_destroy_read_struct(&png, &info, nullptr);
    image.pixels.resize(static_cast<std::size_t>(image.width) * image.height * 3);
    for (std::size_t i = 0; i < samples.size() / 2; ++i) {
      const unsigned value = (samples[2 * i] << 8) | samples[2 * i + 1];  // PNG is big-endian
      const auto level = static_cast<std::uint8_t>((value + 128) / 257);
      image.pixels[3 * i] = image.pixels[3 * i + 1] = image.pixels[3 * i + 2] = level;
    }
    return image;
  }
  // The conversions Pillow's convert("RGB") makes: palette looked up, gray expanded to 8 bits
  // and replicated, alpha (and tRNS transparency) dropped without compositing, 16-bit samples
  // cut to their most significant byte.
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16) png_set_strip_16(png);
  // (the expansions above also turn tRNS into an alpha channel, stripped here too)
  if ((color & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS)) {
    png_set_strip_alpha(png);
  }
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  image.width = static_cast<int>(png_get_image_width(png, info));
  image.height = static_cast<int>(png_get_image_height(png, info));
  if (png_get_rowbytes(png, info) != static_cast<png_size_t>(image.width) * 3) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw UserError("image " + path.string() + " is a PNG of an unsupported kind: save it as RGB");
  }
  image.pixels.resize(static_cast<std::size_t>(image.width) * image.height * 3);
  rows.resize(image.height);
  for (int y = 0; y < image.height; ++y) rows[y] = &image.pixels[static_cast<std::size_t>(y) * image.width * 3];
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return image;
}

}  // namespace

RgbImage decode_image(const fs::path& path) {
  if (fs::is_directory(path)) throw UserError("image " + path.string() + " is a folder: pass image files");
  File file = open_file(path);
  unsigned char magic[8] = {};
  const std::size_t n = std::fread(magic, 1, sizeof magic, file.get());
  std::rewind(file.get());
  if (n >= 3 && magic[0] == 0xFF && magic[1] == 0xD8 && magic[2] == 0xFF) {
    return decode_jpeg(file.get(), path);
  }
  if (n == 8 && png_sig_cmp(magic, 0, 8) == 0) return decode_png(file.get(), path);
  throw UserError("image " + path.string() +
                  " is neither a JPEG nor a PNG file: convert it to one of those");
}

}  // namespace alexnet
