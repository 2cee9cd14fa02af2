// The host path in C++ (issue #22) of the calls whose host time missed their targets: the
// low-latency dispatch and combine, get_dispatch_layout, and the normal-mode dispatch over
// NVLink (fresh with num_worst_tokens, from a layout, cached) and combine. What a later call
// of a known shape does between the Buffer's entry and cuLaunchKernel, without the
// interpreter.
//
// Python stays the reference and the only validator: a call's first use of a shape runs the
// Python path (ep_comm/backends/kernels/low_latency.py), which checks everything, builds the
// launch plan of each buffer half and then teaches this object the plan's argument slots and
// the shape. A later call comes here first. The guard below compares the call's tensors with
// the shapes learnt (dtype, sizes, device, contiguity, 16-byte alignment); on any difference,
// on a status word already set, or while the stream is captured into a CUDA graph, it returns
// None and the Python path runs (and raises its clear error). Otherwise it allocates the
// outputs, writes the per-call arguments into the plan's slots (the same ctypes memory the
// Python path patches) and launches.
//
// Nothing here links against CUDA: cuLaunchKernel, cuStreamIsCapturing, cuEventRecord and
// cuEventSynchronize arrive as function addresses (ep_comm/runtime/host_ext.py), so the CPU
// tests can pass recorders instead.
#include <torch/extension.h>

#include <chrono>
#include <cstring>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using LaunchFn = int (*)(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned smem, void* stream, void** params,
                         void** extra);
using CapturingFn = int (*)(void* stream, int* status);
using EventRecordFn = int (*)(void* event, void* stream);
using EventSyncFn = int (*)(void* event);

// The per-call arguments, in the order this file writes them. ep_comm/backends/kernels/
// host_path.py checks them against args.py's LL_DISPATCH_PER_CALL /
// LL_COMBINE_PER_CALL when it loads this module, so the two lists cannot drift apart.
const std::vector<std::string> kDispatchSlots = {
    "x", "topk_idx", "num_tokens", "num_topk", "recv_x", "recv_scales", "src_info",
    "range_begin", "range_count", "recv_count", "cum_stats", "wait_stats", "call_tag", "phases"};
const std::vector<std::string> kLayoutSlots = {
    "topk_idx", "T", "num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank",
    "scratch"};
const std::vector<std::string> kCombineSlots = {
    "x", "zero_copy", "src_info", "range_begin", "range_count", "topk_idx", "topk_weights",
    "out", "num_tokens", "num_topk", "wait_stats", "call_tag", "phases"};
// The normal-mode NVLink dispatch (args.NVL_NOTIFY_PER_CALL / NVL_DISPATCH_PER_CALL). "sig" is
// the notify's CallSig: CALL_SIG_WORDS int32 by value, the call's signature words.
const std::vector<std::string> kNvlNotifySlots = {
    "T", "num_tokens_per_rank", "num_tokens_per_expert", "rank_prefix_matrix",
    "recv_per_expert", "num_tokens_of_rank", "num_recv_dev", "expert_alignment", "expand_base",
    "sig"};
const std::vector<std::string> kNvlDispatchSlots = {
    "x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank", "T", "rank_prefix_matrix",
    "send_pos", "recv_x", "recv_scales", "recv_topk_idx", "recv_topk_weights", "recv_src_idx",
    "recv_src_rank", "num_rows", "num_recv_dev", "expand", "expand_pos", "expand_base", "exp_x",
    "exp_scales", "exp_w"};
// The normal-mode NVLink combine (args.NVL_COMBINE_PER_CALL).
const std::vector<std::string> kNvlCombineSlots = {
    "x", "topk_w", "recv_src_idx", "rank_prefix_matrix", "num_tokens_of_rank",
    "is_token_in_rank", "send_pos", "T", "bias0", "bias1", "out", "out_w", "num_recv_dev"};

// One argument of a prepared launch: the address of its ctypes scalar and its width (4 or 8
// bytes; a CallSig slot is an int32 array, written with put_words).
struct Slot {
  void* addr = nullptr;
  int bytes = 0;
  void put(int64_t v) const {
    if (bytes == 8) *static_cast<int64_t*>(addr) = v;
    else *static_cast<int32_t*>(addr) = static_cast<int32_t>(v);
  }
  void put_words(const std::vector<int32_t>& w) const {
    std::memcpy(addr, w.data(), w.size() * sizeof(int32_t));
  }
};

// One prepared launch (jit.PreparedLaunch): kernel, argument array, block, shared memory, and
// the slots of the per-call arguments.
struct Launch {
  bool ready = false;
  void* func = nullptr;
  void** params = nullptr;
  unsigned block = 0, smem = 0;
  std::vector<Slot> slots;
  int64_t stage = 0;  // combine: the half's registered send buffer (zero_copy source)

  // ``sig_bytes``: the width a CallSig slot may have (0: none in this launch).
  void set(int64_t f, int64_t p, int64_t b, int64_t sm, const std::vector<int64_t>& addrs,
           const std::vector<int64_t>& widths, size_t expected, int64_t sig_bytes = 0) {
    if (addrs.size() != widths.size() || addrs.size() != expected)
      throw std::invalid_argument("ep_comm internal: wrong number of per-call slots");
    func = reinterpret_cast<void*>(f);
    params = reinterpret_cast<void**>(p);
    block = static_cast<unsigned>(b);
    smem = static_cast<unsigned>(sm);
    slots.clear();
    for (size_t i = 0; i < addrs.size(); ++i) {
      if (widths[i] != 4 && widths[i] != 8 && !(sig_bytes > 0 && widths[i] == sig_bytes))
        throw std::invalid_argument("ep_comm internal: a slot is 4 or 8 bytes");
      slots.push_back(Slot{reinterpret_cast<void*>(addrs[i]), static_cast<int>(widths[i])});
    }
    ready = true;
  }
};

// A shape the Python path validated: tokens, top-k, which optional tensors were given, the
// grid of a whole call (send and receive phases in one launch) and the tag's signature hash.
struct Shape {
  int64_t t, k;
  bool opt_a, opt_b;
  unsigned grid;
  int64_t tag_hash;
};

// A view of the contiguous tensor ``base``: ``sizes`` (and ``strides``, default contiguous) from
// element ``offset`` of it, sharing its storage (which the view keeps alive). Made directly, not
// through the dispatcher: narrow + view are two operator calls per view, and on the host of the
// 2026-12-07 H100 run (session 15) the fresh dispatch's one allocation and seven such views cost
// 27 us (the "alloc" stage of bench/host_overhead.py), against 2.5 us for a cached dispatch's
// one allocation. The views are plain int32 / float tensors the kernels write: no autograd view
// tracking is needed (the outputs never require grad).
at::Tensor carve_as(const at::Tensor& base, caffe2::TypeMeta dtype, int64_t offset,
                    std::initializer_list<int64_t> sizes, std::initializer_list<int64_t> strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(),
                                                   dtype);
  int64_t st[4], n = 0, s = 1;
  const int64_t* sz = sizes.begin();
  const int64_t dims = static_cast<int64_t>(sizes.size());
  if (strides.size() == sizes.size()) {
    for (int64_t v : strides) st[n++] = v;
  } else {
    for (int64_t i = dims - 1; i >= 0; --i) st[i] = s, s *= sz[i];
  }
  impl->set_sizes_and_strides(c10::IntArrayRef(sz, dims), c10::IntArrayRef(st, dims), offset);
  return at::Tensor(std::move(impl));
}

at::Tensor carve(const at::Tensor& base, int64_t offset, std::initializer_list<int64_t> sizes,
                 std::initializer_list<int64_t> strides = {}) {
  return carve_as(base, base.dtype(), base.storage_offset() + offset, sizes, strides);
}

// Several outputs of a call in one allocation: ``add`` reserves a part (at a 256-byte
// boundary, at least what an allocation of its own would give the kernels' vector accesses),
// ``allocate`` makes the one tensor, ``part`` a view of a part as ``dtype``. A CUDA allocation
// costs microseconds of host time (4.2 us on the host of the 2026-12-07 H100 run of session
// 15), so outputs that live as long as each other share one: the payload rows with their
// scales, a handle's small arrays with the received top-k rows; never a large payload with a
// handle that would keep it alive.
class Slab {
 public:
  int64_t add(int64_t nbytes) {
    const int64_t at = bytes_;
    bytes_ += (nbytes + 255) / 256 * 256;
    return at;
  }
  const at::Tensor& allocate(const at::TensorOptions& options) {
    base_ = at::empty({bytes_ > 0 ? bytes_ : 1}, options.dtype(at::kByte));
    return base_;
  }
  at::Tensor part(int64_t at, at::ScalarType dtype, std::initializer_list<int64_t> sizes,
                  std::initializer_list<int64_t> strides = {}) const {
    return carve_as(base_, caffe2::TypeMeta::fromScalarType(dtype),
                    at / static_cast<int64_t>(c10::elementSize(dtype)), sizes, strides);
  }

 private:
  int64_t bytes_ = 0;
  at::Tensor base_;
};

// What every C++ host path shares: the launch and capture entry points, the host status
// words (the first ``status_words`` of them say whether a kernel reported), the device, and
// the guard's tensor tests.
class NativeBase {
 public:
  NativeBase(int64_t launch_fn, int64_t capturing_fn, int64_t status_ptr, int64_t status_words,
             const at::Tensor& like)
      : launch_(reinterpret_cast<LaunchFn>(launch_fn)),
        capturing_(reinterpret_cast<CapturingFn>(capturing_fn)),
        status_(reinterpret_cast<volatile int32_t*>(status_ptr)),
        status_words_(status_words), options_(like.options()), device_(like.device()) {}

 protected:
  // Nothing reported: the Python path reads, raises and clears what a kernel wrote.
  bool status_clear() const {
    for (int64_t i = 0; i < status_words_; ++i)
      if (status_[i] != 0) return false;
    return true;
  }

  bool capturing(int64_t stream) const {
    if (capturing_ == nullptr) return false;
    int st = 0;
    if (capturing_(reinterpret_cast<void*>(stream), &st) != 0) return true;  // ask Python
    return st != 0;
  }

  bool is_ok(const at::Tensor& t, at::ScalarType dtype) const {
    return t.scalar_type() == dtype && t.device() == device_ && t.is_contiguous();
  }

  static bool aligned16(const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  }

  static int64_t ptr(const at::Tensor& t) {
    return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
  }

  static int64_t ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? ptr(*t) : 0; }

  void launch(const Launch& l, unsigned grid, int64_t stream, const char* name) const {
    int err = launch_(l.func, grid, 1, 1, l.block, 1, 1, l.smem, reinterpret_cast<void*>(stream),
                      l.params, nullptr);
    if (err != 0)
      throw std::runtime_error(std::string("cuLaunchKernel(") + name + ", grid=" +
                               std::to_string(grid) + ") failed: CUresult " +
                               std::to_string(err));
  }

  LaunchFn launch_;
  CapturingFn capturing_;
  volatile int32_t* status_;
  int64_t status_words_;
  at::TensorOptions options_;
  at::Device device_;
};

// What both low-latency calls share: two buffer halves, the learnt shapes and the call-tag
// layout (ep_comm.core.constants LL_TAG_*).
class HostPathBase : public NativeBase {
 public:
  HostPathBase(int64_t launch_fn, int64_t capturing_fn, int64_t status_ptr, int64_t status_words,
               const at::Tensor& like, int64_t tag_shift, int64_t tag_mod, bool tags_on,
               int64_t phases)
      : NativeBase(launch_fn, capturing_fn, status_ptr, status_words, like),
        tag_shift_(tag_shift), tag_mod_(tag_mod), tags_on_(tags_on), phases_(phases) {}

  void set_launch(int64_t half, int64_t func, int64_t params, int64_t block, int64_t smem,
                  const std::vector<int64_t>& slot_addrs, const std::vector<int64_t>& slot_bytes,
                  int64_t stage) {
    if (half < 0 || half > 1) throw std::invalid_argument("half must be 0 or 1");
    Launch& l = halves_[half];
    l.set(func, params, block, smem, slot_addrs, slot_bytes, num_slots());
    l.stage = stage;
  }

  void add_shape(int64_t t, int64_t k, bool opt_a, bool opt_b, int64_t grid, int64_t tag_hash) {
    if (find(t, k, opt_a, opt_b) != nullptr) return;
    // A decode loop uses a handful of batch sizes; a workload of many keeps the newest.
    if (shapes_.size() >= 64) shapes_.erase(shapes_.begin());
    shapes_.push_back(Shape{t, k, opt_a, opt_b, static_cast<unsigned>(grid), tag_hash});
  }

  int64_t num_shapes() const { return static_cast<int64_t>(shapes_.size()); }
  bool ready(int64_t half) const { return half >= 0 && half <= 1 && halves_[half].ready; }

 protected:
  virtual size_t num_slots() const = 0;

  const Shape* find(int64_t t, int64_t k, bool a, bool b) const {
    for (const Shape& s : shapes_)
      if (s.t == t && s.k == k && s.opt_a == a && s.opt_b == b) return &s;
    return nullptr;
  }

  // agreement.ll_tag of a call outside capture: its number folded into [1, mod], then the hash.
  int64_t tag(int64_t seq, int64_t hash) const {
    if (!tags_on_) return 0;
    return (((seq - 1) % tag_mod_ + 1) << tag_shift_) | hash;
  }

  int64_t tag_shift_, tag_mod_;
  bool tags_on_;
  int64_t phases_;  // SEND_PHASE | RECV_PHASE: the whole call in one launch
  Launch halves_[2];
  std::vector<Shape> shapes_;
};

// ep_ll_dispatch_{fp8,bf16} for one (M, hidden, experts, format).
class Dispatch : public HostPathBase {
 public:
  Dispatch(int64_t launch_fn, int64_t capturing_fn, int64_t status_ptr, int64_t status_words,
           const at::Tensor& like, int64_t tag_shift, int64_t tag_mod, bool tags_on,
           int64_t phases, int64_t local, int64_t ranks, int64_t m, int64_t hidden,
           bool use_fp8, int64_t scale_cols, bool scales_int32)
      : HostPathBase(launch_fn, capturing_fn, status_ptr, status_words, like, tag_shift, tag_mod,
                     tags_on, phases),
        local_(local), ranks_(ranks), m_(m), hidden_(hidden), use_fp8_(use_fp8),
        scale_cols_(scale_cols), scales_int32_(scales_int32) {}

  // (recv_x, recv_scales or None, src_info, range_begin, range_count, recv_count), or None
  // (the Python path then runs the call).
  py::object call(const at::Tensor& x, const at::Tensor& topk_idx,
                  const c10::optional<at::Tensor>& cum, const c10::optional<at::Tensor>& wait,
                  int64_t half, int64_t seq, int64_t stream) {
    if (!ready(half)) return py::none();
    if (!is_ok(x, at::kBFloat16) || x.dim() != 2 || x.size(1) != hidden_ || !aligned16(x))
      return py::none();
    if (!is_ok(topk_idx, at::kLong) || topk_idx.dim() != 2 || topk_idx.size(0) != x.size(0))
      return py::none();
    const bool has_cum = cum.has_value(), has_wait = wait.has_value();
    if (has_cum && (!is_ok(*cum, at::kInt) || cum->dim() != 1 || cum->size(0) != local_))
      return py::none();
    if (has_wait && (!is_ok(*wait, at::kLong) || wait->dim() != 1 || wait->size(0) != ranks_))
      return py::none();
    const Shape* shape = find(x.size(0), topk_idx.size(1), has_cum, has_wait);
    if (shape == nullptr || !status_clear() || capturing(stream)) return py::none();

    const int64_t rows = ranks_ * m_;
    // the payload and its scales in one allocation (Slab): [L, G, R*M] scales handed out as
    // [L, R*M, G] (column-major per expert)
    const at::ScalarType x_type = use_fp8_ ? at::kFloat8_e4m3fn : at::kBFloat16;
    const at::ScalarType s_type = scales_int32_ ? at::kInt : at::kFloat;
    Slab payload;
    const int64_t x_at = payload.add(local_ * rows * hidden_ * c10::elementSize(x_type));
    const int64_t s_at = use_fp8_ ? payload.add(local_ * scale_cols_ * rows * 4) : 0;
    payload.allocate(options_);
    at::Tensor recv_x = payload.part(x_at, x_type, {local_, rows, hidden_});
    at::Tensor scales;
    if (use_fp8_)
      scales = payload.part(s_at, s_type, {local_, rows, scale_cols_}, {scale_cols_ * rows, 1, rows});
    // the four int32 outputs in one allocation: src_info [L, R*M], range_begin and
    // range_count [L, R], recv_count [L]
    at::Tensor ints = at::empty({local_ * (rows + 2 * ranks_ + 1)}, options_.dtype(at::kInt));
    at::Tensor src_info = carve(ints, 0, {local_, rows});
    at::Tensor begin = carve(ints, local_ * rows, {local_, ranks_});
    at::Tensor count = carve(ints, local_ * (rows + ranks_), {local_, ranks_});
    at::Tensor recv_count = carve(ints, local_ * (rows + 2 * ranks_), {local_});

    const Launch& l = halves_[half];
    const int64_t values[] = {ptr(x), ptr(topk_idx), x.size(0), topk_idx.size(1), ptr(recv_x),
                              use_fp8_ ? ptr(scales) : 0, ptr(src_info), ptr(begin), ptr(count),
                              ptr(recv_count), has_cum ? ptr(*cum) : 0,
                              has_wait ? ptr(*wait) : 0, tag(seq, shape->tag_hash), phases_};
    for (size_t i = 0; i < l.slots.size(); ++i) l.slots[i].put(values[i]);
    launch(l, shape->grid, stream, use_fp8_ ? "ep_ll_dispatch_fp8" : "ep_ll_dispatch_bf16");
    return py::make_tuple(recv_x, use_fp8_ ? py::cast(scales) : py::none(), src_info, begin,
                          count, recv_count);
  }

 protected:
  size_t num_slots() const override { return kDispatchSlots.size(); }

 private:
  int64_t local_, ranks_, m_, hidden_;
  bool use_fp8_;
  int64_t scale_cols_;
  bool scales_int32_;
};

// ep_ll_combine for one (M, hidden, experts).
class Combine : public HostPathBase {
 public:
  Combine(int64_t launch_fn, int64_t capturing_fn, int64_t status_ptr, int64_t status_words,
          const at::Tensor& like, int64_t tag_shift, int64_t tag_mod, bool tags_on,
          int64_t phases, int64_t local, int64_t ranks, int64_t m, int64_t hidden)
      : HostPathBase(launch_fn, capturing_fn, status_ptr, status_words, like, tag_shift, tag_mod,
                     tags_on, phases),
        local_(local), ranks_(ranks), m_(m), hidden_(hidden) {}

  // combined_x [T, H] bf16, or None (the Python path then runs the call). ``src_info``,
  // ``begin`` and ``count`` are the handle's (made by this Buffer's dispatch of this shape).
  py::object call(const at::Tensor& x, bool zero_copy, const at::Tensor& src_info,
                  const at::Tensor& begin, const at::Tensor& count, const at::Tensor& topk_idx,
                  const at::Tensor& weights, const c10::optional<at::Tensor>& out,
                  const c10::optional<at::Tensor>& wait, int64_t half, int64_t seq,
                  int64_t stream) {
    if (!ready(half)) return py::none();
    if (!is_ok(x, at::kBFloat16) || x.dim() != 3 || x.size(0) != local_ ||
        x.size(1) != ranks_ * m_ || x.size(2) != hidden_ || !aligned16(x))
      return py::none();
    if (!is_ok(topk_idx, at::kLong) || topk_idx.dim() != 2) return py::none();
    if (!is_ok(weights, at::kFloat) || weights.dim() != 2 || weights.size(0) != topk_idx.size(0) ||
        weights.size(1) != topk_idx.size(1))
      return py::none();
    const int64_t t = topk_idx.size(0);
    const bool has_out = out.has_value(), has_wait = wait.has_value();
    if (has_out && (!is_ok(*out, at::kBFloat16) || out->dim() != 2 || out->size(0) != t ||
                    out->size(1) != hidden_ || !aligned16(*out)))
      return py::none();
    if (has_wait && (!is_ok(*wait, at::kLong) || wait->dim() != 1 || wait->size(0) != ranks_))
      return py::none();
    const Shape* shape = find(t, topk_idx.size(1), has_out, has_wait);
    if (shape == nullptr || !status_clear() || capturing(stream)) return py::none();

    at::Tensor result = has_out ? *out : at::empty({t, hidden_}, options_.dtype(at::kBFloat16));
    const Launch& l = halves_[half];
    const int64_t values[] = {zero_copy ? l.stage : ptr(x), zero_copy ? 1 : 0, ptr(src_info),
                              ptr(begin), ptr(count), ptr(topk_idx), ptr(weights), ptr(result),
                              t, topk_idx.size(1), has_wait ? ptr(*wait) : 0,
                              tag(seq, shape->tag_hash), phases_};
    for (size_t i = 0; i < l.slots.size(); ++i) l.slots[i].put(values[i]);
    launch(l, shape->grid, stream, "ep_ll_combine");
    return py::cast(result);
  }

 protected:
  size_t num_slots() const override { return kCombineSlots.size(); }

 private:
  int64_t local_, ranks_, m_, hidden_;
};

// get_dispatch_layout's kernel (kernels/cuda/layout.cu) for one (top-k, experts): counts
// [R + E] int32 (per rank, then per expert) and is_token_in_rank [T, R] bool, every element
// written by the kernel. The scratch of zeros the kernel reduces through is one per (experts,
// stream), learnt from the Python path (ep_comm/backends/kernels/layout.py).
class Layout : public NativeBase {
 public:
  // No status words and no capture test: the layout kernel reports nothing, and a captured
  // layout (no host wait in it) is as valid as the Python path's.
  Layout(int64_t launch_fn, const at::Tensor& like, int64_t ranks, int64_t num_topk,
         int64_t num_experts, int64_t threads)
      : NativeBase(launch_fn, 0, 0, 0, like), ranks_(ranks), k_(num_topk), e_(num_experts),
        threads_(threads) {}

  // The plan's kernel, argument array and the slots of topk_idx, T, num_tokens_per_rank,
  // num_tokens_per_expert, is_token_in_rank and scratch (kLayoutSlots' order).
  void set_launch(int64_t func, int64_t params, int64_t block, int64_t smem,
                  const std::vector<int64_t>& slot_addrs, const std::vector<int64_t>& slot_bytes) {
    l_.set(func, params, block, smem, slot_addrs, slot_bytes, kLayoutSlots.size());
  }

  // A token count whose first call the Python path ran (and checked the ids of on the host).
  void add_tokens(int64_t t) {
    for (int64_t v : tokens_)
      if (v == t) return;
    if (tokens_.size() >= 64) tokens_.erase(tokens_.begin());
    tokens_.push_back(t);
  }

  void add_scratch(int64_t stream, int64_t scratch) {
    for (auto& s : scratch_)
      if (s.first == stream) { s.second = scratch; return; }
    scratch_.emplace_back(stream, scratch);
  }

  // (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R]
  // bool; the two counts are views of one allocation), or None (the Python path runs).
  py::object call(const at::Tensor& topk_idx, int64_t stream) {
    if (!l_.ready || !is_ok(topk_idx, at::kLong) || topk_idx.dim() != 2 ||
        topk_idx.size(1) != k_)
      return py::none();
    bool known = false;
    for (int64_t v : tokens_) known |= v == topk_idx.size(0);
    if (!known) return py::none();
    int64_t scratch = 0;
    for (const auto& s : scratch_)
      if (s.first == stream) scratch = s.second;
    if (scratch == 0) return py::none();
    const int64_t t = topk_idx.size(0);
    at::Tensor counts = at::empty({ranks_ + e_}, options_.dtype(at::kInt));
    at::Tensor in_rank = at::empty({t, ranks_}, options_.dtype(at::kBool));
    const int64_t values[] = {ptr(topk_idx), t, ptr(counts), ptr(counts) + 4 * ranks_,
                              ptr(in_rank), scratch};
    for (size_t i = 0; i < l_.slots.size(); ++i) l_.slots[i].put(values[i]);
    launch(l_, static_cast<unsigned>((t + threads_ - 1) / threads_), stream,
           "nvl_get_dispatch_layout");
    return py::make_tuple(carve(counts, 0, {ranks_}), carve(counts, ranks_, {e_}), in_rank);
  }

 private:
  int64_t ranks_, k_, e_, threads_;
  Launch l_;
  std::vector<std::pair<int64_t, int64_t>> scratch_;  // (stream, scratch address)
  std::vector<int64_t> tokens_;
};


// The stages of a C++ call whose host time Stamps sums (NvlDispatch::stage_ns): the guard,
// the CUDA allocations and views, the launches (cuLaunchKernel), the count wait of a dispatch
// from a layout, and the conversion of the outputs into a Python tuple.
enum Stage { kStageGuard, kStageAlloc, kStageLaunch, kStageWait, kStageReturn, kStages };
const std::vector<std::string> kStageNames = {"guard", "alloc", "launch", "wait", "return"};

// Time since the last mark, added to a stage; does nothing when off (one branch per mark).
struct Stamps {
  bool on;
  int64_t ns[kStages] = {};
  std::chrono::steady_clock::time_point last;
  explicit Stamps(bool timing) : on(timing) {
    if (on) last = std::chrono::steady_clock::now();
  }
  void mark(Stage s) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    ns[s] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
    last = now;
  }
};

// A normal-mode dispatch plan the Python path built (IntranodeRuntime._dispatch_plan): the
// notify launch (fresh dispatches only) and the dispatch launch, what the plan was built for,
// and the token counts / expert alignments its calls were validated with.
struct NvlPlan {
  Launch notify, dispatch;
  at::ScalarType dtype;
  int64_t hidden, k, e;
  bool scales, has_idx, has_w;
  unsigned grid;
  std::vector<int32_t> sig;  // the call's signature words; word 0 (the number) set per call
  py::object signature;      // agreement.Signature that numbers the call (Comm.begin_call)
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (tokens, expert_alignment)

  bool knows(int64_t t, int64_t alignment) const {
    for (const auto& s : shapes)
      if (s.first == t && s.second == alignment) return true;
    return false;
  }
};

// nvl_notify + nvl_dispatch (kernels/cuda/intranode.cu) of one IntranodeRuntime, for one kind of
// call: fresh with num_worst_tokens (two launches, no host wait), fresh from a layout
// (num_worst_tokens == 0: the host waits for the notify's counts through an event, bounded
// because the notify kernel gives up after its timeout and writes the status word), or cached
// (handle=: the dispatch launch alone). One object per (kind, num_worst_tokens, Config); its
// plans are told apart by dtype, hidden, scales, top-k, weights and experts.
class NvlDispatch : public NativeBase {
 public:
  NvlDispatch(int64_t launch_fn, int64_t capturing_fn, int64_t record_fn, int64_t sync_fn,
              int64_t event, int64_t status_ptr, int64_t status_words, int64_t num_recv_word,
              int64_t counts_word, const at::Tensor& like, int64_t ranks, bool fresh,
              int64_t worst)
      : NativeBase(launch_fn, capturing_fn, status_ptr, status_words, like),
        record_(reinterpret_cast<EventRecordFn>(record_fn)),
        sync_(reinterpret_cast<EventSyncFn>(sync_fn)), event_(reinterpret_cast<void*>(event)),
        num_recv_word_(num_recv_word), counts_word_(counts_word), r_(ranks), fresh_(fresh),
        worst_(worst) {}

  // After the Python path ran a call of plan (notify, dispatch) for (x's dtype, hidden,
  // scales, top-k, weights, experts) with ``t`` tokens and ``alignment``: remember both.
  // The notify's (kernel, argument array, block, shared memory, slots) are 0 / empty for a
  // cached dispatch; ``grid`` is the dispatch launch's.
  void learn(int64_t n_func, int64_t n_params, int64_t n_block, int64_t n_smem,
             const std::vector<int64_t>& n_addrs, const std::vector<int64_t>& n_widths,
             int64_t func, int64_t params, int64_t block, int64_t smem,
             const std::vector<int64_t>& addrs, const std::vector<int64_t>& widths, int64_t grid,
             const at::Tensor& x, bool scales, int64_t k, bool has_idx, bool has_w, int64_t e,
             const std::vector<int64_t>& sig, py::object signature, int64_t t,
             int64_t alignment) {
    NvlPlan* plan = nullptr;
    for (NvlPlan& p : plans_)
      if (p.dispatch.params == reinterpret_cast<void**>(params)) plan = &p;
    if (plan == nullptr) {
      if (plans_.size() >= 16) plans_.erase(plans_.begin());  // the newest plans are used
      plans_.emplace_back();
      plan = &plans_.back();
      if (fresh_)
        plan->notify.set(n_func, n_params, n_block, n_smem, n_addrs, n_widths,
                         kNvlNotifySlots.size(), 4 * static_cast<int64_t>(sig.size()));
      plan->dispatch.set(func, params, block, smem, addrs, widths, kNvlDispatchSlots.size());
      plan->dtype = x.scalar_type();
      plan->hidden = x.size(1);
      plan->scales = scales;
      plan->k = k;
      plan->has_idx = has_idx;
      plan->has_w = has_w;
      plan->e = e;
      plan->grid = static_cast<unsigned>(grid);
      plan->sig.assign(sig.begin(), sig.end());
      plan->signature = std::move(signature);
    }
    if (!plan->knows(t, alignment)) {
      if (plan->shapes.size() >= 64) plan->shapes.erase(plan->shapes.begin());
      plan->shapes.emplace_back(t, alignment);
    }
  }

  int64_t num_plans() const { return static_cast<int64_t>(plans_.size()); }

  // Where a call's host time goes (bench/host_overhead.py prints it; off by default, and then
  // each stage costs one predictable branch): on set_timing(true) the sums restart; stage_ns()
  // is (calls timed, then the summed ns of each of kStages stages, in the order of kStageNames).
  void set_timing(bool on) {
    timing_ = on;
    timed_calls_ = 0;
    for (int64_t& v : stage_ns_) v = 0;
  }
  std::vector<int64_t> stage_ns() const {
    std::vector<int64_t> out{timed_calls_};
    out.insert(out.end(), stage_ns_, stage_ns_ + kStages);
    return out;
  }

  // Whether the plan whose dispatch arguments live at ``params`` knows (t, alignment).
  bool knows(int64_t params, int64_t t, int64_t alignment) const {
    for (const NvlPlan& p : plans_)
      if (p.dispatch.params == reinterpret_cast<void**>(params)) return p.knows(t, alignment);
    return false;
  }

  // A fresh dispatch: (recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
  // rank_prefix_matrix [R, R], recv_per_expert [L], num_tokens_of_rank [R], num_recv [1],
  // send_pos [T, R], recv_src_idx [N], recv_src_rank [N] (int32), num_recv_tokens (-1 with
  // num_worst_tokens), the per-expert counts (a list, None with num_worst_tokens), the count
  // wait in ns, the call's Signature); (wait ns, Signature) when the notify kernel reported
  // a failure (the caller raises it from the status word); or None (declined: nothing launched).
  py::object fresh(const at::Tensor& x, const c10::optional<at::Tensor>& x_scales,
                   const at::Tensor& ntpr, const at::Tensor& in_rank, const at::Tensor& ntpe,
                   const c10::optional<at::Tensor>& idx, const c10::optional<at::Tensor>& w,
                   int64_t alignment, int64_t seq, int64_t stream) {
    Stamps st(timing_);
    if (!fresh_ || x.dim() != 2 || x.device() != device_ || !x.is_contiguous() || !aligned16(x))
      return py::none();
    const int64_t t = x.size(0);
    const int64_t k = idx.has_value() ? (idx->dim() == 2 ? idx->size(1) : -1) : 0;
    const NvlPlan* plan = find(x, x_scales.has_value(), k, idx.has_value(), w.has_value(),
                               ntpe.dim() == 1 ? ntpe.size(0) : -1);
    if (plan == nullptr || !scales_ok(x_scales, t, plan->hidden)) return py::none();
    if (!is_ok(ntpr, at::kInt) || ntpr.dim() != 1 || ntpr.size(0) != r_) return py::none();
    if (!is_ok(in_rank, at::kBool) || in_rank.dim() != 2 || in_rank.size(0) != t ||
        in_rank.size(1) != r_ || !is_ok(ntpe, at::kInt))
      return py::none();
    if (idx.has_value() && (!is_ok(*idx, at::kLong) || idx->size(0) != t)) return py::none();
    if (w.has_value() && (!is_ok(*w, at::kFloat) || w->dim() != 2 || w->size(0) != t ||
                          w->size(1) != k))
      return py::none();
    if (!plan->knows(t, alignment) || seq > INT32_MAX || !status_clear()) return py::none();
    if (worst_ == 0 && capturing(stream)) return py::none();  // the count wait cannot capture
    st.mark(kStageGuard);

    // The notify's outputs in one allocation: rank_prefix_matrix [R, R], recv_per_expert [L],
    // num_tokens_of_rank [R], num_recv [1]. With num_worst_tokens the rows are known before
    // the notify runs, so the routes (below) share it, from a 16-byte boundary: one CUDA
    // allocation less (the kernels read these int32 arrays element by element).
    const int64_t r = r_, local = plan->e / r_;
    const int64_t head = (r * r + local + r + 1 + 3) / 4 * 4;
    // With num_worst_tokens the routes and the received top-k rows (whose row count is then
    // known) join them: the handle's arrays and the top-k rows in one allocation (Slab).
    Slab small_slab;
    const int64_t head_at = small_slab.add((worst_ > 0 ? head + t * r + 2 * worst_ : head) * 4);
    Meta meta = worst_ > 0 ? add_meta(*plan, worst_, small_slab) : Meta{};
    small_slab.allocate(options_);
    at::Tensor small = small_slab.part(head_at, at::kInt,
                                       {worst_ > 0 ? head + t * r + 2 * worst_ : head});
    at::Tensor prefix = carve(small, 0, {r, r});
    at::Tensor per_expert = carve(small, r * r, {local});
    at::Tensor of_rank = carve(small, r * r + local, {r});
    at::Tensor num_recv = carve(small, r * r + local + r, {1});
    const int64_t notify_values[] = {t, ptr(ntpr), ptr(ntpe), ptr(prefix), ptr(per_expert),
                                     ptr(of_rank), ptr(num_recv), alignment, 0};
    const Launch& n = plan->notify;
    for (size_t i = 0; i + 1 < n.slots.size(); ++i) n.slots[i].put(notify_values[i]);
    std::vector<int32_t> words = plan->sig;
    words[0] = static_cast<int32_t>(seq);
    n.slots.back().put_words(words);
    st.mark(kStageAlloc);
    launch(n, 1, stream, "nvl_notify");
    st.mark(kStageLaunch);

    int64_t rows = worst_, n_recv = -1, wait_ns = 0;
    py::object counts = py::none();
    if (worst_ == 0) {
      // Wait for exactly the notify kernel, not for whatever else the stream holds; without
      // the GIL, as torch's Event.synchronize on the Python path.
      const auto t0 = std::chrono::steady_clock::now();
      int err = 0;
      {
        py::gil_scoped_release nogil;
        err = record_(event_, reinterpret_cast<void*>(stream));
        if (err == 0) err = sync_(event_);
      }
      wait_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                    std::chrono::steady_clock::now() - t0).count();
      if (err != 0)
        throw std::runtime_error("ep_comm: the count wait of a dispatch failed: CUresult " +
                                 std::to_string(err));
      if (status_[0] != 0) return py::make_tuple(wait_ns, plan->signature);
      n_recv = rows = status_[num_recv_word_];
      py::list c(local);
      for (int64_t i = 0; i < local; ++i) c[i] = py::int_(status_[counts_word_ + i]);
      counts = std::move(c);
      st.mark(kStageWait);
    }
    // send_pos [T, R], recv_src_idx [N] and recv_src_rank [N], and the received top-k rows,
    // in one allocation (with num_worst_tokens: the one above)
    at::Tensor route = small;
    int64_t at0 = head;
    if (worst_ == 0) {
      Slab route_slab;
      const int64_t route_at = route_slab.add((t * r + 2 * rows) * 4);
      meta = add_meta(*plan, rows, route_slab);
      route_slab.allocate(options_);
      route = route_slab.part(route_at, at::kInt, {t * r + 2 * rows});
      at0 = 0;
      take_meta(*plan, rows, route_slab, meta);
    } else {
      take_meta(*plan, rows, small_slab, meta);
    }
    at::Tensor send_pos = carve(route, at0, {t, r});
    at::Tensor src_idx = carve(route, at0 + t * r, {rows});
    at::Tensor src_rank = carve(route, at0 + t * r + rows, {rows});
    Outputs o = outputs(*plan, rows);
    o.idx = meta.idx;
    o.w = meta.w;
    st.mark(kStageAlloc);
    const int64_t values[] = {ptr(x), ptr(x_scales), ptr(idx), ptr(w), ptr(in_rank), t,
                              ptr(prefix), ptr(send_pos), ptr(o.x), ptr(o.scales),
                              ptr(o.idx), ptr(o.w), ptr(src_idx), ptr(src_rank), rows,
                              ptr(num_recv), 0, 0, 0, 0, 0, 0};
    put_and_launch(*plan, values, stream);
    st.mark(kStageLaunch);
    py::object out = py::make_tuple(o.x, opt(o.scales), opt(o.idx), opt(o.w), prefix, per_expert,
                                    of_rank, num_recv, send_pos, src_idx, src_rank, n_recv,
                                    counts, wait_ns, plan->signature);
    st.mark(kStageReturn);
    add_stamps(st);
    return out;
  }

  // A cached dispatch along a handle's routes: (recv_x, recv_scales or None, the call's
  // Signature), or None (declined). ``rows``: the handle's received rows; ``e``: its experts.
  py::object cached(const at::Tensor& x, const c10::optional<at::Tensor>& x_scales,
                    const at::Tensor& in_rank, const at::Tensor& prefix,
                    const at::Tensor& src_idx, const at::Tensor& src_rank,
                    const at::Tensor& num_recv, int64_t rows, int64_t e, int64_t alignment,
                    int64_t stream) {
    Stamps st(timing_);
    if (fresh_ || x.dim() != 2 || x.device() != device_ || !x.is_contiguous() || !aligned16(x))
      return py::none();
    const int64_t t = x.size(0);
    const NvlPlan* plan = find(x, x_scales.has_value(), 0, false, false, e);
    if (plan == nullptr || !scales_ok(x_scales, t, plan->hidden)) return py::none();
    if (!is_ok(in_rank, at::kBool) || in_rank.dim() != 2 || in_rank.size(0) != t ||
        in_rank.size(1) != r_ || !is_ok(prefix, at::kInt) || !is_ok(src_idx, at::kInt) ||
        !is_ok(src_rank, at::kInt) || !is_ok(num_recv, at::kInt) || src_idx.numel() != rows ||
        src_rank.numel() != rows)
      return py::none();
    if (!plan->knows(t, alignment) || !status_clear()) return py::none();
    st.mark(kStageGuard);
    Outputs o = outputs(*plan, rows);
    st.mark(kStageAlloc);
    const int64_t values[] = {ptr(x), ptr(x_scales), 0, 0, ptr(in_rank), t, ptr(prefix), 0,
                              ptr(o.x), ptr(o.scales), 0, 0, ptr(src_idx), ptr(src_rank), rows,
                              ptr(num_recv), 0, 0, 0, 0, 0, 0};
    put_and_launch(*plan, values, stream);
    st.mark(kStageLaunch);
    py::object out = py::make_tuple(o.x, opt(o.scales), plan->signature);
    st.mark(kStageReturn);
    add_stamps(st);
    return out;
  }

 private:
  // recv_x [N, H] (x's dtype), recv_scales [N, H / 128] float32, recv_topk_idx [N, K] int64,
  // recv_topk_weights [N, K] float32, as the plan's call has them (every row written by
  // nvl_dispatch, padding rows included).
  struct Outputs {
    at::Tensor x;
    c10::optional<at::Tensor> scales, idx, w;
  };

  // recv_x and recv_scales in one allocation (the payload: they live as long as each other);
  // the top-k rows come from ``add_meta`` / ``take_meta`` (the handle's allocation).
  Outputs outputs(const NvlPlan& p, int64_t rows) const {
    Slab payload;
    const int64_t x_at = payload.add(rows * p.hidden * c10::elementSize(p.dtype));
    const int64_t s_at = p.scales ? payload.add(rows * (p.hidden / 128) * 4) : 0;
    payload.allocate(options_);
    Outputs o;
    o.x = payload.part(x_at, p.dtype, {rows, p.hidden});
    if (p.scales) o.scales = payload.part(s_at, at::kFloat, {rows, p.hidden / 128});
    return o;
  }

  // recv_topk_idx [N, K] int64 and recv_topk_weights [N, K] float32 as parts of ``slab``:
  // ``add_meta`` reserves them (before ``allocate``), ``take_meta`` carves them (after).
  struct Meta {
    int64_t idx_at = -1, w_at = -1;
    c10::optional<at::Tensor> idx, w;
  };
  static Meta add_meta(const NvlPlan& p, int64_t rows, Slab& slab) {
    Meta m;
    if (p.has_idx) m.idx_at = slab.add(rows * p.k * 8);
    if (p.has_w) m.w_at = slab.add(rows * p.k * 4);
    return m;
  }
  static void take_meta(const NvlPlan& p, int64_t rows, const Slab& slab, Meta& m) {
    if (p.has_idx) m.idx = slab.part(m.idx_at, at::kLong, {rows, p.k});
    if (p.has_w) m.w = slab.part(m.w_at, at::kFloat, {rows, p.k});
  }

  static py::object opt(const c10::optional<at::Tensor>& t) {
    return t.has_value() ? py::cast(*t) : py::none();
  }

  const NvlPlan* find(const at::Tensor& x, bool scales, int64_t k, bool has_idx, bool has_w,
                      int64_t e) const {
    for (const NvlPlan& p : plans_)
      if (p.dtype == x.scalar_type() && p.hidden == x.size(1) && p.scales == scales &&
          p.k == k && p.has_idx == has_idx && p.has_w == has_w && p.e == e)
        return &p;
    return nullptr;
  }

  // x's scales: [T, H / 128] float32, contiguous (as Buffer.dispatch makes them), or absent.
  bool scales_ok(const c10::optional<at::Tensor>& s, int64_t t, int64_t hidden) const {
    return !s.has_value() || (is_ok(*s, at::kFloat) && s->dim() == 2 && s->size(0) == t &&
                              s->size(1) == hidden / 128);
  }

  void put_and_launch(const NvlPlan& p, const int64_t* values, int64_t stream) const {
    for (size_t i = 0; i < p.dispatch.slots.size(); ++i) p.dispatch.slots[i].put(values[i]);
    launch(p.dispatch, p.grid, stream, "nvl_dispatch");
  }

  void add_stamps(const Stamps& st) {
    if (!st.on) return;
    ++timed_calls_;
    for (int i = 0; i < kStages; ++i) stage_ns_[i] += st.ns[i];
  }

  bool timing_ = false;
  int64_t timed_calls_ = 0;
  int64_t stage_ns_[kStages] = {};
  EventRecordFn record_;
  EventSyncFn sync_;
  void* event_;
  int64_t num_recv_word_, counts_word_, r_;
  bool fresh_;
  int64_t worst_;
  std::vector<NvlPlan> plans_;
};

// A normal-mode combine plan the Python path built (IntranodeRuntime._combine_plan): the
// launch and what it was built for. Told apart by hidden, top-k, weights or not, experts.
struct NvlCombinePlan {
  Launch launch;
  int64_t hidden, k, e;
  bool has_w;
  unsigned grid;
  py::object signature;  // agreement.Signature that numbers the call (Comm.begin_call)
};

// nvl_combine (kernels/cuda/intranode.cu) of one IntranodeRuntime for one Config: a later
// combine of a learnt plan along a dispatch handle's routes. Nothing in the Python path's
// checks of a combine depends on the token count T or the received rows N other than through
// the equalities below (x has the handle's N rows, the weights too, each bias is [T, H]; the
// buffer size check of one node depends on hidden and the Config alone), so any (N, T) runs
// here once the plan is learnt; whatever differs from the plan is declined.
class NvlCombine : public NativeBase {
 public:
  // No capture test: the combine waits for nothing on the host, so a captured call is as
  // valid as the Python path's.
  NvlCombine(int64_t launch_fn, int64_t status_ptr, int64_t status_words, const at::Tensor& like,
             int64_t ranks)
      : NativeBase(launch_fn, 0, status_ptr, status_words, like), r_(ranks) {}

  // After the Python path ran a combine of plan (kernel, argument array, block, shared memory,
  // the slots of kNvlCombineSlots, grid) for rows of ``hidden``, ``k`` weights per row
  // (``has_w``; 0 without weights) and ``e`` experts: remember it with the call's Signature.
  // True when that made room by forgetting the oldest plan.
  bool learn(int64_t func, int64_t params, int64_t block, int64_t smem,
             const std::vector<int64_t>& addrs, const std::vector<int64_t>& widths, int64_t grid,
             int64_t hidden, int64_t k, bool has_w, int64_t e, py::object signature) {
    if (find(hidden, k, has_w, e) != nullptr) return false;
    const bool evict = plans_.size() >= 16;
    if (evict) plans_.erase(plans_.begin());  // the newest plans are used
    plans_.emplace_back();
    NvlCombinePlan& p = plans_.back();
    p.launch.set(func, params, block, smem, addrs, widths, kNvlCombineSlots.size());
    p.hidden = hidden;
    p.k = k;
    p.has_w = has_w;
    p.e = e;
    p.grid = static_cast<unsigned>(grid);
    p.signature = std::move(signature);
    return evict;
  }

  bool knows(int64_t hidden, int64_t k, bool has_w, int64_t e) const {
    return find(hidden, k, has_w, e) != nullptr;
  }

  int64_t num_plans() const { return static_cast<int64_t>(plans_.size()); }

  // combined_x [T, H] bf16, combined_topk_weights [T, K] float32 (None without weights) and
  // the call's Signature; or None (declined: nothing allocated or launched). x [N, H] bf16,
  // w [N, K] float32 or None, bias0 / bias1 [T, H] bf16 or None; the handle's
  // is_token_in_rank [T, R] bool, rank_prefix_matrix [R, R], send_pos [T, R], recv_src_idx
  // [N], num_tokens_of_rank [R] and num_recv [1] int32, its ``rows`` (N) and ``e`` experts.
  py::object call(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                  const c10::optional<at::Tensor>& bias0, const c10::optional<at::Tensor>& bias1,
                  const at::Tensor& in_rank, const at::Tensor& prefix,
                  const at::Tensor& send_pos, const at::Tensor& src_idx,
                  const at::Tensor& of_rank, const at::Tensor& num_recv, int64_t rows,
                  int64_t e, int64_t stream) {
    if (!is_ok(x, at::kBFloat16) || x.dim() != 2 || x.size(0) != rows || !aligned16(x))
      return py::none();
    const bool has_w = w.has_value();
    const int64_t k = has_w ? (w->dim() == 2 ? w->size(1) : -1) : 0;
    const NvlCombinePlan* plan = find(x.size(1), k, has_w, e);
    if (plan == nullptr) return py::none();
    if (has_w && (!is_ok(*w, at::kFloat) || w->size(0) != rows)) return py::none();
    if (!is_ok(in_rank, at::kBool) || in_rank.dim() != 2 || in_rank.size(1) != r_ ||
        !is_ok(prefix, at::kInt) || !is_ok(send_pos, at::kInt) || !is_ok(src_idx, at::kInt) ||
        !is_ok(of_rank, at::kInt) || !is_ok(num_recv, at::kInt) || num_recv.numel() != 1)
      return py::none();
    const int64_t t = in_rank.size(0);
    if (!bias_ok(bias0, t, plan->hidden) || !bias_ok(bias1, t, plan->hidden) ||
        (bias1.has_value() && !bias0.has_value()))
      return py::none();
    if (!status_clear()) return py::none();

    at::Tensor out = at::empty({t, plan->hidden}, options_.dtype(at::kBFloat16));
    c10::optional<at::Tensor> out_w;
    if (has_w) out_w = at::empty({t, k}, options_.dtype(at::kFloat));
    const int64_t values[] = {ptr(x), ptr(w), ptr(src_idx), ptr(prefix), ptr(of_rank),
                              ptr(in_rank), ptr(send_pos), t, ptr(bias0), ptr(bias1), ptr(out),
                              ptr(out_w), ptr(num_recv)};
    const Launch& l = plan->launch;
    for (size_t i = 0; i < l.slots.size(); ++i) l.slots[i].put(values[i]);
    launch(l, plan->grid, stream, "nvl_combine");
    return py::make_tuple(out, has_w ? py::cast(*out_w) : py::none(), plan->signature);
  }

 private:
  // A bias: [T, H] bf16, contiguous, on the device (Buffer._validate_combine's check), or none.
  bool bias_ok(const c10::optional<at::Tensor>& b, int64_t t, int64_t hidden) const {
    return !b.has_value() || (is_ok(*b, at::kBFloat16) && b->dim() == 2 && b->size(0) == t &&
                              b->size(1) == hidden);
  }

  const NvlCombinePlan* find(int64_t hidden, int64_t k, bool has_w, int64_t e) const {
    for (const NvlCombinePlan& p : plans_)
      if (p.hidden == hidden && p.k == k && p.has_w == has_w && p.e == e) return &p;
    return nullptr;
  }

  int64_t r_;
  std::vector<NvlCombinePlan> plans_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ep_comm's C++ host path: the low-latency calls, the layout and the NVLink dispatch "
            "and combine (kernels/host/host_path.cpp)";
  m.attr("DISPATCH_SLOTS") = kDispatchSlots;
  m.attr("COMBINE_SLOTS") = kCombineSlots;
  m.attr("LAYOUT_SLOTS") = kLayoutSlots;
  m.attr("NVL_NOTIFY_SLOTS") = kNvlNotifySlots;
  m.attr("NVL_DISPATCH_SLOTS") = kNvlDispatchSlots;
  m.attr("STAGE_NAMES") = kStageNames;
  m.attr("NVL_COMBINE_SLOTS") = kNvlCombineSlots;
  py::class_<NvlCombine>(m, "NvlCombine")
      .def(py::init<int64_t, int64_t, int64_t, const at::Tensor&, int64_t>())
      .def("learn", &NvlCombine::learn)
      .def("knows", &NvlCombine::knows)
      .def("num_plans", &NvlCombine::num_plans)
      .def("call", &NvlCombine::call);
  py::class_<NvlDispatch>(m, "NvlDispatch")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, const at::Tensor&, int64_t, bool, int64_t>())
      .def("learn", &NvlDispatch::learn)
      .def("num_plans", &NvlDispatch::num_plans)
      .def("knows", &NvlDispatch::knows)
      .def("fresh", &NvlDispatch::fresh)
      .def("cached", &NvlDispatch::cached)
      .def("set_timing", &NvlDispatch::set_timing)
      .def("stage_ns", &NvlDispatch::stage_ns);
  py::class_<Layout>(m, "Layout")
      .def(py::init<int64_t, const at::Tensor&, int64_t, int64_t, int64_t, int64_t>())
      .def("set_launch", &Layout::set_launch)
      .def("add_tokens", &Layout::add_tokens)
      .def("add_scratch", &Layout::add_scratch)
      .def("call", &Layout::call);
  py::class_<Dispatch>(m, "Dispatch")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, const at::Tensor&, int64_t, int64_t, bool,
                    int64_t, int64_t, int64_t, int64_t, int64_t, bool, int64_t, bool>())
      .def("set_launch", &Dispatch::set_launch)
      .def("add_shape", &Dispatch::add_shape)
      .def("num_shapes", &Dispatch::num_shapes)
      .def("ready", &Dispatch::ready)
      .def("call", &Dispatch::call);
  py::class_<Combine>(m, "Combine")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, const at::Tensor&, int64_t, int64_t, bool,
                    int64_t, int64_t, int64_t, int64_t, int64_t>())
      .def("set_launch", &Combine::set_launch)
      .def("add_shape", &Combine::add_shape)
      .def("num_shapes", &Combine::num_shapes)
      .def("ready", &Combine::ready)
      .def("call", &Combine::call);
}
