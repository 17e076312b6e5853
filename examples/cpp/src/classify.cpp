#include "alexnet/classify.hpp"

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <mutex>
#include <numeric>
#include <thread>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "alexnet/preprocess.hpp"

namespace alexnet {

Prediction top_k(const std::string& source, const float* logits,
                 const std::vector<std::string>& classes, int k) {
  const int n = static_cast<int>(classes.size());
  k = std::clamp(k, 1, n);
  // softmax in double, shifted by the largest logit so exp cannot overflow
  const double top = *std::max_element(logits, logits + n);
  std::vector<double> p(n);
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += (p[i] = std::exp(static_cast<double>(logits[i]) - top));
  for (double& v : p) v /= sum;
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  Prediction pred{source, {}, {}, {}};
  for (int i = 0; i < k; ++i) {
    pred.indices.push_back(order[i]);
    pred.labels.push_back(classes[order[i]]);
    pred.probabilities.push_back(p[order[i]]);
  }
  return pred;
}

namespace {

struct Options {
  int threads = 1;
  int top_k = 5;
  bool json = false;
  std::string engine;
  std::vector<std::string> images;
};

[[noreturn]] void usage_error(const std::string& program, const std::string& what) {
  throw UserError(what + " (usage: " + program +
                  " [--threads N] [--top-k K] [--json] ENGINE_DIR IMAGE...)");
}

int positive(const std::string& program, const std::string& flag, const char* value) {
  char* end = nullptr;
  const long v = value ? std::strtol(value, &end, 10) : 0;
  if (!value || *end != '\0' || v < 1 || v > 1024) {
    usage_error(program, flag + " needs a whole number from 1 to 1024");
  }
  return static_cast<int>(v);
}

Options parse(int argc, char** argv) {
  const std::string program = argc > 0 ? argv[0] : "alexnet_classify";
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--threads") {
      o.threads = positive(program, arg, i + 1 < argc ? argv[++i] : nullptr);
    } else if (arg == "--top-k") {
      o.top_k = positive(program, arg, i + 1 < argc ? argv[++i] : nullptr);
    } else if (arg == "--json") {
      o.json = true;
    } else if (arg == "-h" || arg == "--help") {
      std::cout << "usage: " << program << " [--threads N] [--top-k K] [--json] ENGINE_DIR IMAGE...\n"
                << "Classify JPEG/PNG images with an alexnet-deploy engine folder; print the top K\n"
                << "(default 5) classes and probabilities per image, or one JSON object per line\n"
                << "with --json. N worker threads (default 1) each run their own session.\n";
      std::exit(0);
    } else if (arg.size() > 1 && arg[0] == '-') {
      usage_error(program, "unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) usage_error(program, "pass an engine folder and at least one image");
  o.engine = positional[0];
  o.images.assign(positional.begin() + 1, positional.end());
  return o;
}

void print(const Prediction& p, bool as_json) {
  if (as_json) {
    nlohmann::json j = {{"source", p.source}, {"indices", p.indices}, {"labels", p.labels},
                        {"probabilities", p.probabilities}};
    std::cout << j.dump() << '\n';
    return;
  }
  std::cout << p.source << '\n';
  for (std::size_t i = 0; i < p.indices.size(); ++i) {
    char line[64];
    std::snprintf(line, sizeof line, "  %8.5f  %4d  ", p.probabilities[i], p.indices[i]);
    std::cout << line << p.labels[i] << '\n';
  }
}

// Classify every image on `threads` workers; each creates its own session and takes the next
// unclaimed image until none is left. The first error stops the others and is rethrown.
std::vector<Prediction> classify_all(const EngineInfo& engine, const Options& o,
                                     const SessionFactory& make_session) {
  const std::size_t n = o.images.size();
  const int workers = static_cast<int>(std::min<std::size_t>(o.threads, n));
  const int classes = static_cast<int>(engine.classes.size());
  // An engine with a smallest batch above 1 gets zero padding; only the first row is read.
  const int batch = engine.min_batch;
  std::vector<Prediction> results(n);
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_lock;
  auto work = [&] {
    try {
      std::unique_ptr<Session> session = make_session();
      // float32 NCHW, or the pixels of a uint8-input engine (operator new aligns for float)
      std::vector<std::uint8_t> input(static_cast<std::size_t>(batch) * engine.input_bytes(), 0);
      std::vector<float> logits(static_cast<std::size_t>(batch) * classes);
      for (std::size_t i = next++; i < n && !failed; i = next++) {
        if (engine.uint8_input) {
          load_pixels(o.images[i], engine.preprocess, input.data());
        } else {
          load_input(o.images[i], engine.preprocess, reinterpret_cast<float*>(input.data()));
        }
        session->infer(input.data(), batch, logits.data());
        results[i] = top_k(o.images[i], logits.data(), engine.classes, o.top_k);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_lock);
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < workers; ++t) pool.emplace_back(work);
  work();  // the main thread is worker 0
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  return results;
}

// Ctrl-C: one line and status 130, like the Python CLI (the apps write no files).
extern "C" void on_interrupt(int) {
  static const char message[] = "interrupted\n";
  ssize_t ignored = write(STDERR_FILENO, message, sizeof message - 1);  // async-signal-safe
  (void)ignored;
  _exit(130);
}

}  // namespace

int classify_main(int argc, char** argv, const std::string& backend, const Loader& loader) {
  std::signal(SIGINT, on_interrupt);
  try {
    const Options o = parse(argc, argv);
    const EngineInfo engine = read_engine(o.engine, backend);
    if (engine.max_batch && *engine.max_batch < engine.min_batch) {
      throw UserError("engine " + engine.dir.string() + " has an empty batch range: rebuild it");
    }
    const SessionFactory make_session =
        loader(engine, static_cast<int>(std::min<std::size_t>(o.threads, o.images.size())));
    for (const Prediction& p : classify_all(engine, o, make_session)) print(p, o.json);
    return 0;
  } catch (const UserError& e) {
    std::cout.flush();
    std::cerr << "error: " << e.what() << '\n';
    return 2;
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << "error: unexpected failure: " << e.what() << '\n';
    return 1;
  }
}

}  // namespace alexnet
