// Microbenchmarks of Cairn's hot paths, in bytes per second of block data:
//
//   BM_BlockHash          XXH3-64 of one block (BlockHash::Of), as the source
//                         hashes each record and the sink checks it.
//   BM_EpochDigest        what one data record costs the epoch digest: its
//                         block hash, then EpochHasher::Add (XXH3-128 over the
//                         record descriptors); Finish once per run.
//   BM_RecordEncodeCopy   a data Record frame as the in-process link sends it:
//                         payload hash, protobuf body, EncodeFrame (one
//                         contiguous copy of header, body and payload).
//   BM_RecordEncodeHeader the same without the copy, as the TCP link and the
//                         spool send it (EncodeHeader, then gather writes).
//   BM_RecordDecodeVerify ReadFrame from a byte string (header and body
//                         checked), the body parsed, the payload hash checked.
//   BM_SpoolWrite         a 64 MiB epoch of verified Record frames appended to
//                         a SpoolWriter (io_uring, O_DIRECT) in a temp
//                         directory under /tmp, Sync() (fdatasync) included.
//   BM_SpoolRead          the same spool read back with SpoolReader, all frames
//                         to the end, the file in the page cache (CPU cost).
//   BM_SpoolReadCold      the same with the page cache dropped before each read
//                         (as at the sink: the spool was written O_DIRECT).
//   BM_SendEpochFull      SendEpoch of a 64 MiB in-memory image of random data
//                         (MemoryPool) into a FrameWriter that only counts.
//   BM_SendEpochIncr      SendEpoch of the same image after ~10% of its 64 KiB
//                         chunks were rewritten (bytes: the changed data).
//   BM_VerifyEpochFull / BM_VerifyEpochIncr
//                         the sink's EpochVerifier over the frames of those
//                         two epochs (held in memory).
//
// Every setup step is checked: a failed step aborts with its Status, so no
// figure is ever reported for a benchmark that did not run what it says.
//
// Run (after ./build.sh):
//   build/bench/micro_bench --benchmark_min_time=0.2
//   build/bench/micro_bench --benchmark_filter='Spool' --benchmark_min_time=1
// Spool files go to $TMPDIR (default /tmp)/cairn-bench-XXXXXX, removed at
// exit; the spool figures are those of that file system.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "engine/base/checksum.h"
#include "engine/base/status.h"
#include "engine/catalog/catalog.h"
#include "engine/epoch/epoch.h"
#include "engine/format/frame.h"
#include "engine/spool/spool.h"
#include "engine/volume/memory_volume.h"
#include "engine/volume/volume.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kImageSize = 64 * kMiB;   // the in-memory image of the epoch benchmarks
constexpr uint64_t kSpoolEpoch = 64 * kMiB;  // payload bytes of one spooled epoch
constexpr uint64_t kChunk = 64 * kKiB;       // MemoryPool chunk: the unit of change
constexpr char kVolume[] = "bench";

// A benchmark that cannot set up (or whose measured step fails) must not
// print figures: say why and stop.
[[noreturn]] void Die(std::string_view what, const Status& st) {
  std::fprintf(stderr, "micro_bench: %.*s: %s\n", static_cast<int>(what.size()), what.data(),
               st.ToString().c_str());
  std::abort();
}

void Check(const Status& st, std::string_view what) {
  if (!st.ok()) Die(what, st);
}

template <typename T>
T Must(StatusOr<T> v, std::string_view what) {
  if (!v.ok()) Die(what, v.status());
  return std::move(v).value();
}

std::vector<char> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<char> out(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t w = rng();
    std::memcpy(out.data() + i, &w, std::min<size_t>(8, n - i));
  }
  return out;
}

// The body of data Record `index` of epoch `seq` carrying `payload`, as
// SendEpoch builds it.
std::string RecordBody(uint64_t seq, uint64_t index, uint64_t offset,
                       std::span<const char> payload) {
  pb::Record r;
  r.set_index(index);
  r.set_offset(offset);
  r.set_length(payload.size());
  r.set_kind(pb::DATA);
  r.set_xxh3(BlockHash::Of(payload).value());
  r.set_seq(seq);
  return r.SerializeAsString();
}

// --- hashing -------------------------------------------------------------------------------------

void BM_BlockHash(benchmark::State& state) {
  const std::vector<char> block = RandomBytes(state.range(0), 1);
  for (auto _ : state) {
    BlockHash h = BlockHash::Of(block);
    benchmark::DoNotOptimize(h);
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_BlockHash)->Arg(4 * kKiB)->Arg(64 * kKiB)->Arg(1 * kMiB);

void BM_EpochDigest(benchmark::State& state) {
  const uint64_t n = state.range(0);
  const std::vector<char> block = RandomBytes(n, 2);
  EpochHasher hasher(1, kImageSize);
  uint64_t offset = 0;
  for (auto _ : state) {
    const BlockHash h = BlockHash::Of(block);
    hasher.Add(offset, n, RecordKind::kData, h);
    offset += n;
  }
  EpochDigest d = hasher.Finish();
  benchmark::DoNotOptimize(d);
  state.SetBytesProcessed(state.iterations() * n);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EpochDigest)->Arg(4 * kKiB)->Arg(64 * kKiB)->Arg(1 * kMiB);

// --- framing -------------------------------------------------------------------------------------

void BM_RecordEncodeCopy(benchmark::State& state) {
  const std::vector<char> payload = RandomBytes(state.range(0), 3);
  uint64_t index = 0;
  for (auto _ : state) {
    const std::string body = RecordBody(1, index, index * payload.size(), payload);
    std::string frame = EncodeFrame(FrameType::kRecord, body, payload);
    benchmark::DoNotOptimize(frame.data());
    ++index;
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_RecordEncodeCopy)->Arg(64 * kKiB)->Arg(1 * kMiB);

void BM_RecordEncodeHeader(benchmark::State& state) {
  const std::vector<char> payload = RandomBytes(state.range(0), 4);
  uint64_t index = 0;
  for (auto _ : state) {
    const std::string body = RecordBody(1, index, index * payload.size(), payload);
    auto header = EncodeHeader(FrameType::kRecord, body, static_cast<uint32_t>(payload.size()));
    benchmark::DoNotOptimize(header.data());
    ++index;
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_RecordEncodeHeader)->Arg(64 * kKiB)->Arg(1 * kMiB);

void BM_RecordDecodeVerify(benchmark::State& state) {
  const std::vector<char> payload = RandomBytes(state.range(0), 5);
  const std::string bytes = EncodeFrame(FrameType::kRecord, RecordBody(1, 0, 0, payload), payload);
  for (auto _ : state) {
    StringSource src(bytes);
    Frame f = Must(ReadFrame(src), "reading the Record frame");
    pb::Record r;
    if (!r.ParseFromString(f.body)) Die("parsing the Record body", DataLoss("does not parse"));
    if (BlockHash::Of(f.payload) != BlockHash(r.xxh3())) {
      Die("verifying the Record payload", DataLoss("block checksum mismatch"));
    }
    benchmark::DoNotOptimize(f.payload.data());
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(BM_RecordDecodeVerify)->Arg(64 * kKiB)->Arg(1 * kMiB);

// --- spool ---------------------------------------------------------------------------------------

// A fresh directory under $TMPDIR (or /tmp), removed with its files at exit.
class ScratchDir {
 public:
  ScratchDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/cairn-bench-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) {
      Die("creating the scratch directory", ErrnoStatus(-errno, tmpl));
    }
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

ScratchDir& Scratch() {
  static ScratchDir dir;
  return dir;
}

// One epoch of data Record frames of `block` bytes each, as the sink holds
// them after verification. The payloads share one random buffer.
struct SpoolEpoch {
  std::vector<char> payload;
  std::vector<std::string> bodies;
};

SpoolEpoch MakeSpoolEpoch(uint64_t block) {
  SpoolEpoch e;
  e.payload = RandomBytes(block, 6);
  for (uint64_t i = 0; i < kSpoolEpoch / block; ++i) {
    e.bodies.push_back(RecordBody(1, i, i * block, e.payload));
  }
  return e;
}

// Appends `e` as the sink does (EncodeHeader, Append per frame) and syncs.
uint64_t WriteSpool(const std::filesystem::path& path, const SpoolEpoch& e) {
  auto w = Must(SpoolWriter::Create(path, {kVolume, 1}), "creating the spool");
  for (const std::string& body : e.bodies) {
    const auto header =
        EncodeHeader(FrameType::kRecord, body, static_cast<uint32_t>(e.payload.size()));
    Check(w->Append(header, body, e.payload), "appending to the spool");
  }
  return Must(w->Sync(), "syncing the spool");
}

void BM_SpoolWrite(benchmark::State& state) {
  const SpoolEpoch e = MakeSpoolEpoch(state.range(0));
  const std::filesystem::path path = Scratch().path() / "write.spool";
  uint64_t written = 0;
  for (auto _ : state) {
    written += WriteSpool(path, e);
    state.PauseTiming();
    std::error_code ec;
    std::filesystem::remove(path, ec);  // each epoch gets a new file, as at the sink
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * kSpoolEpoch);
  state.counters["spool_bytes"] = static_cast<double>(written / state.iterations());
}
BENCHMARK(BM_SpoolWrite)
    ->Arg(64 * kKiB)
    ->Arg(1 * kMiB)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Reads the whole spool at `path` as the sink's apply does; returns the
// payload bytes.
uint64_t ReadSpool(const std::filesystem::path& path) {
  auto r = Must(SpoolReader::Open(path, {kVolume, 1}), "opening the spool");
  uint64_t payload = 0;
  for (;;) {
    StatusOr<Frame> f = r->Next();
    if (!f.ok()) {
      if (f.status().code() != Code::kAborted) Die("reading the spool", f.status());
      break;
    }
    payload += f->payload.size();
  }
  if (payload != kSpoolEpoch) Die("reading the spool", DataLoss("short spool"));
  return payload;
}

// The spool of one epoch of `block`-byte records, written once per block
// size (a benchmark function runs several times).
const std::filesystem::path& ReadSpoolFile(uint64_t block) {
  static std::map<uint64_t, std::filesystem::path> files;
  auto [it, fresh] =
      files.try_emplace(block, Scratch().path() / ("read-" + std::to_string(block) + ".spool"));
  if (fresh) WriteSpool(it->second, MakeSpoolEpoch(block));
  return it->second;
}

// Drops the file's pages from the page cache (they are clean: synced).
void DropCache(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) Die("opening the spool to drop its cache", ErrnoStatus(-errno, path.string()));
  const int err = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  if (err != 0) Die("dropping the spool's cache", ErrnoStatus(-err, path.string()));
}

// Page cache hot: the reader's own cost (the first, cold read is not timed).
void BM_SpoolRead(benchmark::State& state) {
  const std::filesystem::path& path = ReadSpoolFile(state.range(0));
  ReadSpool(path);
  for (auto _ : state) ReadSpool(path);
  state.SetBytesProcessed(state.iterations() * kSpoolEpoch);
}
BENCHMARK(BM_SpoolRead)
    ->Arg(64 * kKiB)
    ->Arg(1 * kMiB)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Page cache cold, as at the sink: the spool was written with O_DIRECT, so
// apply reads it from the disk.
void BM_SpoolReadCold(benchmark::State& state) {
  const std::filesystem::path& path = ReadSpoolFile(state.range(0));
  for (auto _ : state) {
    state.PauseTiming();
    DropCache(path);
    state.ResumeTiming();
    ReadSpool(path);
  }
  state.SetBytesProcessed(state.iterations() * kSpoolEpoch);
}
BENCHMARK(BM_SpoolReadCold)
    ->Arg(64 * kKiB)
    ->Arg(1 * kMiB)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// --- epochs --------------------------------------------------------------------------------------

// Discards frames, counting their bytes on the wire.
class CountingFrameWriter final : public FrameWriter {
 public:
  Status Write(FrameType, std::string_view body, std::span<const char> payload) override {
    bytes += kFrameHeaderSize + body.size() + payload.size();
    return OkStatus();
  }
  uint64_t bytes = 0;
};

// Keeps the frames, for the verifier benchmarks.
class CapturingFrameWriter final : public FrameWriter {
 public:
  Status Write(FrameType type, std::string_view body, std::span<const char> payload) override {
    frames.push_back(Frame{type, std::string(body), Payload(payload.begin(), payload.end())});
    return OkStatus();
  }
  std::vector<Frame> frames;
};

// A 64 MiB image of random data at snapshot cairn.1, ~10% of its chunks
// rewritten at cairn.2, and the frames of both epochs.
struct EpochBed {
  MemoryPool pool{"bench"};
  std::unique_ptr<Volume> vol;
  EpochPlan full;
  EpochPlan incr;
  EpochSummary full_sent;
  EpochSummary incr_sent;
  std::vector<Frame> full_frames;
  std::vector<Frame> incr_frames;
};

void WriteAt(Volume& vol, uint64_t offset, std::span<const char> bytes) {
  auto io = Must(vol.OpenIo(""), "opening the image for writing");
  Check(io->StartWrite(0, offset, bytes), "writing the image");
  Check(io->WaitOne().status, "writing the image");
  Check(io->Drain(), "flushing the image");
}

EpochBed& Bed() {
  static EpochBed* bed = [] {
    auto* b = new EpochBed;
    Check(b->pool.Create(kVolume, kImageSize), "creating the image");
    b->vol = Must(b->pool.Open(kVolume), "opening the image");
    const std::vector<char> data = RandomBytes(kImageSize, 7);
    WriteAt(*b->vol, 0, data);
    Check(b->vol->CreateSnap(SnapName(1)), "taking snapshot 1");
    std::mt19937_64 rng(8);
    std::set<uint64_t> changed;
    while (changed.size() < kImageSize / kChunk / 10) changed.insert(rng() % (kImageSize / kChunk));
    for (uint64_t c : changed) WriteAt(*b->vol, c * kChunk, RandomBytes(kChunk, 100 + c));
    Check(b->vol->CreateSnap(SnapName(2)), "taking snapshot 2");

    b->full.id.volume = kVolume;
    b->full.id.seq = 1;
    b->full.to_snap = SnapName(1);
    const std::vector<SnapInfo> snaps = Must(b->vol->ListSnaps(), "listing the snapshots");
    b->full.to_snap_id = snaps.at(0).id;
    b->full.id.image_size = kImageSize;
    b->full.id.source_site = "a";
    CapturingFrameWriter full_out;
    b->full_sent = Must(SendEpoch(*b->vol, b->full, {}, full_out), "sending the full epoch");
    b->full_frames = std::move(full_out.frames);

    b->incr = b->full;
    b->incr.id.seq = 2;
    b->incr.id.base_seq = 1;
    b->incr.from_snap = SnapName(1);
    b->incr.to_snap = SnapName(2);
    b->incr.from_snap_id = snaps.at(0).id;
    b->incr.to_snap_id = snaps.at(1).id;
    b->incr.prev_chain = b->full_sent.chain;
    CapturingFrameWriter incr_out;
    b->incr_sent = Must(SendEpoch(*b->vol, b->incr, {}, incr_out), "sending the incremental epoch");
    b->incr_frames = std::move(incr_out.frames);
    if (b->full_sent.data_bytes != kImageSize) {
      Die("checking the full epoch", Internal("it does not carry the whole image"));
    }
    return b;
  }();
  return *bed;
}

void SendEpochBench(benchmark::State& state, const EpochPlan& plan, const EpochSummary& expect) {
  EpochBed& bed = Bed();
  uint64_t wire = 0;
  for (auto _ : state) {
    CountingFrameWriter out;
    const EpochSummary s = Must(SendEpoch(*bed.vol, plan, {}, out), "sending the epoch");
    if (s.chain != expect.chain) Die("sending the epoch", DataLoss("chain digest changed"));
    wire += out.bytes;
  }
  state.SetBytesProcessed(state.iterations() * expect.data_bytes);
  state.counters["records"] = static_cast<double>(expect.records);
  state.counters["wire_bytes"] = static_cast<double>(wire / state.iterations());
}

void BM_SendEpochFull(benchmark::State& state) {
  SendEpochBench(state, Bed().full, Bed().full_sent);
}
BENCHMARK(BM_SendEpochFull)->Unit(benchmark::kMillisecond);

void BM_SendEpochIncr(benchmark::State& state) {
  SendEpochBench(state, Bed().incr, Bed().incr_sent);
}
BENCHMARK(BM_SendEpochIncr)->Unit(benchmark::kMillisecond);

void VerifyEpochBench(benchmark::State& state, const std::vector<Frame>& frames, uint64_t base_seq,
                      ChainDigest prev_chain, const EpochSummary& expect) {
  for (auto _ : state) {
    EpochVerifier v(kVolume, base_seq, prev_chain);
    for (const Frame& f : frames) Must(v.Check(f), "verifying the epoch");
    if (!v.done() || v.summary().chain != expect.chain) {
      Die("verifying the epoch", DataLoss("the verified chain differs from the sent one"));
    }
  }
  state.SetBytesProcessed(state.iterations() * expect.data_bytes);
  state.counters["records"] = static_cast<double>(expect.records);
}

void BM_VerifyEpochFull(benchmark::State& state) {
  EpochBed& bed = Bed();
  VerifyEpochBench(state, bed.full_frames, 0, ChainDigest(), bed.full_sent);
}
BENCHMARK(BM_VerifyEpochFull)->Unit(benchmark::kMillisecond);

void BM_VerifyEpochIncr(benchmark::State& state) {
  EpochBed& bed = Bed();
  VerifyEpochBench(state, bed.incr_frames, 1, bed.full_sent.chain, bed.incr_sent);
}
BENCHMARK(BM_VerifyEpochIncr)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace cairn

BENCHMARK_MAIN();
