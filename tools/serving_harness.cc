// TF Serving's loading path, alone: tensorflow::LoadSavedModel (the SavedModelBundle TF Serving
// builds, its MetaGraph's graph_def dropped after loading as TF Serving's default
// remove_unused_fields_from_bundle_metagraph does) + Session::Run of a signature.
// Built by tools/bench_serving.py against the TensorFlow wheel (its headers and
// libtensorflow_cc.so.2 / libtensorflow_framework.so.2); never committed as a binary.
//
//   serving_harness memory DIR [--batch=N] [--config=F] [--calls=N] [--signature=K] [--keep-graph-def]
//     one JSON line: VmHWM / VmRSS (MiB) and seconds after loading, after the first call, and
//     after N more calls (settled).
//   serving_harness latency NAME=DIR... [--batches=1,16] [--rounds=N] [--warmup=N] [--seed=S]
//       [--config=F] [--signature=K]
//     every model loaded in this one process; per batch, warm-up calls, then rounds of one call
//     of each model in a new random order each round; one JSON line: "BATCH" -> name -> wall
//     seconds per call, and "cpu BATCH" -> name -> CPU seconds of the process per call.
//   serving_harness outputs DIR --inputs=FILE --out=FILE [--signature=K] [--config=F]
//     the signature run once on the tensors of --inputs (one per input key, no other); every
//     output written to --out, under its signature output key (tools/check_serving.py).
//
// Tensors files (--inputs, --out): a sequence of records, each an 8-byte little-endian length
// and a serialized tensorflow.NamedTensorProto (name: the signature's input or output key).
// --config: a serialized tensorflow.ConfigProto, the session config of every model loaded.
// Inputs of memory and latency: random values of each input's dtype and shape, an unknown first
// dimension set to the batch (any other unknown dimension is an error).

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor.pb.h"
#include "tensorflow/core/protobuf/config.pb.h"
#include "tensorflow/core/protobuf/named_tensor.pb.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string mode, config, signature = "serving_default", inputs, out;
  std::vector<std::string> models;
  std::vector<int> batches = {1};
  int rounds = 30, warmup = 3, calls = 10;
  unsigned seed = 0;
  bool keep_graph_def = false;
};

[[noreturn]] void Fail(const std::string& message) {
  std::cerr << "serving_harness: " << message << std::endl;
  std::exit(2);
}

std::vector<int> ParseInts(const std::string& text) {
  std::vector<int> values;
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, ',');) values.push_back(std::stoi(item));
  return values;
}

Options ParseArgs(int argc, char** argv) {
  if (argc < 3)
    Fail("usage: serving_harness memory DIR | latency NAME=DIR... | outputs DIR [--flags]");
  Options o;
  o.mode = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const char* flag) -> const char* {
      size_t n = std::string(flag).size();
      return arg.compare(0, n, flag) == 0 ? argv[i] + n : nullptr;
    };
    if (const char* v = value("--batch=")) o.batches = {std::stoi(v)};
    else if (const char* v = value("--batches=")) o.batches = ParseInts(v);
    else if (const char* v = value("--config=")) o.config = v;
    else if (const char* v = value("--rounds=")) o.rounds = std::stoi(v);
    else if (const char* v = value("--warmup=")) o.warmup = std::stoi(v);
    else if (const char* v = value("--calls=")) o.calls = std::stoi(v);
    else if (const char* v = value("--seed=")) o.seed = std::stoul(v);
    else if (const char* v = value("--signature=")) o.signature = v;
    else if (const char* v = value("--inputs=")) o.inputs = v;
    else if (const char* v = value("--out=")) o.out = v;
    else if (arg == "--keep-graph-def") o.keep_graph_def = true;
    else if (arg.compare(0, 2, "--") == 0) Fail("unknown flag " + arg);
    else o.models.push_back(arg);
  }
  if (o.mode != "memory" && o.mode != "latency" && o.mode != "outputs")
    Fail("unknown mode " + o.mode);
  if (o.mode != "latency" && o.models.size() != 1) Fail(o.mode + ": one SavedModel directory");
  if (o.mode == "outputs" && (o.inputs.empty() || o.out.empty()))
    Fail("outputs: --inputs=FILE and --out=FILE");
  return o;
}

// VmHWM and VmRSS of this process, in MiB.
std::pair<double, double> Memory() {
  std::ifstream status("/proc/self/status");
  double hwm = 0, rss = 0;
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) hwm = std::stod(line.substr(6)) / 1024;
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stod(line.substr(6)) / 1024;
  }
  return {hwm, rss};
}

struct Model {
  tensorflow::SavedModelBundle bundle;
  std::vector<std::string> input_keys, input_names, output_keys, output_names;
  std::vector<tensorflow::TensorInfo> inputs;
};

std::unique_ptr<Model> Load(const std::string& dir, const Options& o) {
  tensorflow::SessionOptions session_options;
  if (!o.config.empty()) {
    std::ifstream file(o.config, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (!session_options.config.ParseFromString(bytes)) Fail("cannot parse " + o.config);
  }
  auto model = std::make_unique<Model>();
  auto status = tensorflow::LoadSavedModel(session_options, tensorflow::RunOptions(), dir,
                                           {"serve"}, &model->bundle);
  if (!status.ok()) Fail(dir + ": " + status.ToString());
  auto& signatures = model->bundle.meta_graph_def.signature_def();
  auto found = signatures.find(o.signature);
  if (found == signatures.end()) Fail(dir + ": no signature " + o.signature);
  for (const auto& [key, info] : found->second.inputs()) {   // a std::map would sort; order
    model->input_keys.push_back(key);                         // does not matter to Run
    model->input_names.push_back(info.name());
    model->inputs.push_back(info);
  }
  for (const auto& [key, info] : found->second.outputs()) {
    model->output_keys.push_back(key);
    model->output_names.push_back(info.name());
  }
  if (!o.keep_graph_def) {                    // what TF Serving keeps: the signatures alone
    tensorflow::SignatureDef kept = found->second;
    tensorflow::MetaGraphDef empty;
    model->bundle.meta_graph_def.Swap(&empty);
    (*model->bundle.meta_graph_def.mutable_signature_def())[o.signature] = kept;
  }
  return model;
}

template <typename Flat, typename Value>
void Fill(Flat flat, Value value) {
  for (long i = 0; i < flat.size(); ++i) flat(i) = value();
}

tensorflow::Tensor RandomTensor(const tensorflow::TensorInfo& info, int batch, std::mt19937& rng) {
  tensorflow::TensorShape shape;
  const auto& dims = info.tensor_shape().dim();
  for (int i = 0; i < dims.size(); ++i) {
    long size = dims[i].size();
    if (size < 0 && i == 0) size = batch;
    if (size < 0) Fail(info.name() + ": unknown dimension " + std::to_string(i));
    shape.AddDim(size);
  }
  tensorflow::Tensor tensor(info.dtype(), shape);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  switch (info.dtype()) {
    case tensorflow::DT_FLOAT:
      Fill(tensor.flat<float>(), [&] { return uniform(rng); });
      break;
    case tensorflow::DT_DOUBLE:
      Fill(tensor.flat<double>(), [&] { return uniform(rng); });
      break;
    case tensorflow::DT_INT32:
      Fill(tensor.flat<int32_t>(), [] { return 0; });
      break;
    case tensorflow::DT_INT64:
      Fill(tensor.flat<int64_t>(), [] { return 0; });
      break;
    default:
      Fail(info.name() + ": input dtype " + tensorflow::DataTypeString(info.dtype()) +
           " is not supported");
  }
  return tensor;
}

std::vector<std::pair<std::string, tensorflow::Tensor>> Feeds(const Model& m, int batch,
                                                               std::mt19937& rng) {
  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  for (size_t i = 0; i < m.inputs.size(); ++i)
    feeds.emplace_back(m.input_names[i], RandomTensor(m.inputs[i], batch, rng));
  return feeds;
}

std::vector<tensorflow::Tensor> Run(
    const Model& m, const std::vector<std::pair<std::string, tensorflow::Tensor>>& feeds) {
  std::vector<tensorflow::Tensor> outputs;
  auto status = m.bundle.session->Run(feeds, m.output_names, {}, &outputs);
  if (!status.ok()) Fail("Session::Run: " + status.ToString());
  return outputs;
}

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// CPU seconds of this process (every thread), for the CPU time of a call: on a machine that
// others share, the work a call does wanders less than its wall time.
double CpuSeconds() {
  timespec now;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &now);
  return now.tv_sec + now.tv_nsec * 1e-9;
}

std::string Point(const char* name, double seconds) {
  auto [hwm, rss] = Memory();
  std::ostringstream out;
  out << "\"" << name << "\": {\"hwm_mib\": " << hwm << ", \"rss_mib\": " << rss
      << ", \"seconds\": " << seconds << "}";
  return out.str();
}

int MemoryMode(const Options& o) {
  std::mt19937 rng(o.seed);
  auto start = Clock::now();
  auto model = Load(o.models[0], o);
  std::string load = Point("load", Since(start));
  auto feeds = Feeds(*model, o.batches[0], rng);
  start = Clock::now();
  Run(*model, feeds);
  std::string first = Point("first_call", Since(start));
  start = Clock::now();
  for (int i = 0; i < o.calls; ++i) Run(*model, feeds);
  std::string settled = Point("settled", Since(start));
  std::cout << "{" << load << ", " << first << ", " << settled << "}" << std::endl;
  return 0;
}

int LatencyMode(const Options& o) {
  std::vector<std::string> names;
  std::vector<std::unique_ptr<Model>> models;
  for (const auto& spec : o.models) {
    auto eq = spec.find('=');
    if (eq == std::string::npos) Fail("latency: NAME=DIR, got " + spec);
    names.push_back(spec.substr(0, eq));
    models.push_back(Load(spec.substr(eq + 1), o));
  }
  std::mt19937 rng(o.seed);
  std::ostringstream out;
  out << "{";
  for (size_t b = 0; b < o.batches.size(); ++b) {
    std::vector<std::vector<std::pair<std::string, tensorflow::Tensor>>> feeds;
    for (const auto& m : models) feeds.push_back(Feeds(*m, o.batches[b], rng));
    for (size_t i = 0; i < models.size(); ++i)
      for (int w = 0; w < o.warmup; ++w) Run(*models[i], feeds[i]);
    std::vector<std::vector<double>> wall(models.size()), cpu(models.size());
    std::vector<size_t> order(models.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    for (int r = 0; r < o.rounds; ++r) {
      std::shuffle(order.begin(), order.end(), rng);
      for (size_t i : order) {
        double cpu_start = CpuSeconds();
        auto start = Clock::now();
        Run(*models[i], feeds[i]);
        wall[i].push_back(Since(start));
        cpu[i].push_back(CpuSeconds() - cpu_start);
      }
    }
    auto series = [&](const char* key, const std::vector<std::vector<double>>& times) {
      out << "\"" << key << o.batches[b] << "\": {";
      for (size_t i = 0; i < models.size(); ++i) {
        out << (i ? ", " : "") << "\"" << names[i] << "\": [";
        for (size_t r = 0; r < times[i].size(); ++r) out << (r ? ", " : "") << times[i][r];
        out << "]";
      }
      out << "}";
    };
    out << (b ? ", " : "");
    series("", wall);
    out << ", ";
    series("cpu ", cpu);
  }
  out << "}";
  std::cout << out.str() << std::endl;
  return 0;
}

// A tensors file (see the top of this file): key -> tensor, in the file's order.
std::vector<std::pair<std::string, tensorflow::Tensor>> ReadTensors(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) Fail("cannot read " + path);
  std::vector<std::pair<std::string, tensorflow::Tensor>> tensors;
  for (unsigned char size[8]; file.read(reinterpret_cast<char*>(size), 8);) {
    uint64_t length = 0;
    for (int i = 7; i >= 0; --i) length = length << 8 | size[i];
    std::string bytes(length, '\0');
    tensorflow::NamedTensorProto named;
    if (!file.read(&bytes[0], length) || !named.ParseFromString(bytes))
      Fail(path + ": record " + std::to_string(tensors.size()) + " is not a NamedTensorProto");
    tensorflow::Tensor tensor;
    if (!tensor.FromProto(named.tensor())) Fail(path + ": " + named.name() + " is not a tensor");
    tensors.emplace_back(named.name(), tensor);
  }
  if (!file.eof()) Fail("cannot read " + path);
  return tensors;
}

void WriteTensors(const std::string& path, const std::vector<std::string>& keys,
                  const std::vector<tensorflow::Tensor>& tensors) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  for (size_t i = 0; i < keys.size(); ++i) {
    tensorflow::NamedTensorProto named;
    named.set_name(keys[i]);
    tensors[i].AsProtoTensorContent(named.mutable_tensor());
    std::string bytes = named.SerializeAsString();
    unsigned char size[8];
    for (int b = 0; b < 8; ++b) size[b] = static_cast<uint64_t>(bytes.size()) >> (8 * b) & 0xff;
    file.write(reinterpret_cast<const char*>(size), 8);
    file.write(bytes.data(), bytes.size());
  }
  if (!file.flush()) Fail("cannot write " + path);
}

int OutputsMode(const Options& o) {
  auto model = Load(o.models[0], o);
  std::map<std::string, tensorflow::Tensor> given;
  for (auto& [key, tensor] : ReadTensors(o.inputs))
    if (!given.emplace(key, tensor).second) Fail(o.inputs + ": " + key + " twice");
  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  for (size_t i = 0; i < model->input_keys.size(); ++i) {
    auto found = given.find(model->input_keys[i]);
    if (found == given.end()) Fail(o.inputs + ": no tensor for input " + model->input_keys[i]);
    feeds.emplace_back(model->input_names[i], found->second);
    given.erase(found);
  }
  if (!given.empty()) Fail(o.inputs + ": " + given.begin()->first + " is not an input of " +
                           o.signature);
  WriteTensors(o.out, model->output_keys, Run(*model, feeds));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = ParseArgs(argc, argv);
  if (o.mode == "outputs") return OutputsMode(o);
  return o.mode == "memory" ? MemoryMode(o) : LatencyMode(o);
}
