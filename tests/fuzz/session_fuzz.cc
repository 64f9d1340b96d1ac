// libFuzzer target: the sink's session state machine (Sink::Serve) against
// a source that may say anything: Hello, resumes, epochs, Unchanged, in any
// order and with any bodies. The input is a script of frames, each
//   [u8 type][u16 body length][body][u16 payload length][payload]
// and every frame reaches the sink well-formed on the wire (the harness
// encodes it, checksums included), so mutations exercise the protocol, not
// the frame parser (frame_fuzz does that). The sink must answer or close,
// never crash or hang, and make a restore point only of an epoch that
// verified: every point in the catalog has its standby snapshot.
//
// Seeds: with CAIRN_FUZZ_SEED_DIR set, the target writes a real session
// there at start (a Hello, then a full epoch of 3 records and a second,
// incremental one, from SendEpoch), which tests/fuzz/run.sh does.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "engine/catalog/catalog.h"
#include "engine/catalog/kv_store.h"
#include "engine/epoch/epoch.h"
#include "engine/replication/replication.h"
#include "engine/replication/sink.h"
#include "engine/spool/memory_spool_store.h"
#include "engine/volume/memory_volume.h"
#include "proto/cairn.pb.h"

namespace {

using namespace cairn;
using namespace std::chrono_literals;

// Appends frames to a script.
class ScriptWriter final : public FrameWriter {
 public:
  Status Write(FrameType type, std::string_view body, std::span<const char> payload) override {
    script.push_back(static_cast<char>(type));
    Put16(body.size());
    script.append(body);
    Put16(payload.size());
    script.append(payload.data(), payload.size());
    return OkStatus();
  }
  std::string script;

 private:
  void Put16(size_t n) {
    script.push_back(static_cast<char>(n & 0xff));
    script.push_back(static_cast<char>((n >> 8) & 0xff));
  }
};

constexpr uint64_t kImageSize = 1 << 20;

std::string HelloBody() {
  pb::Hello h;
  h.set_protocol_version(kProtocolVersion);
  h.set_volume("vol");
  h.set_pool("rbd");
  h.set_image("img-standby");
  h.set_source_site("a");
  return h.SerializeAsString();
}

// A real session: Hello, a full epoch, an incremental one.
std::string SeedScript() {
  MemoryPool pool("rbd");
  (void)pool.Create("img", kImageSize);
  std::unique_ptr<Volume> vol = std::move(pool.Open("img")).value();
  auto write = [&](uint64_t off, char c) {
    const std::string data(16 * 1024, c);
    auto io = vol->OpenIo("");
    if (io.ok() && (*io)->StartWrite(0, off, std::span<const char>(data)).ok()) {
      (void)(*io)->WaitOne();
    }
  };
  ScriptWriter out;
  (void)out.Write(FrameType::kHello, HelloBody(), {});
  write(0, 'a');
  write(512 * 1024, 'b');
  (void)vol->CreateSnap("cairn.1");
  SendOptions opt;
  opt.block_size = 64 * 1024;
  EpochPlan plan;
  plan.id = EpochId{"vol", 1, 0, kImageSize, 1, "a", "", 0};
  plan.to_snap = "cairn.1";
  plan.to_snap_id = (*vol->ListSnaps())[0].id;
  auto first = SendEpoch(*vol, plan, opt, out);
  write(4096, 'c');
  (void)vol->CreateSnap("cairn.2");
  EpochPlan next;
  next.id = EpochId{"vol", 2, 1, kImageSize, 2, "a", "", 0};
  next.from_snap = "cairn.1";
  next.from_snap_id = plan.to_snap_id;
  next.to_snap = "cairn.2";
  next.to_snap_id = (*vol->ListSnaps())[1].id;
  if (first.ok()) next.prev_chain = first->chain;
  (void)SendEpoch(*vol, next, opt, out);
  return out.script;
}

uint16_t Get16(const uint8_t*& p, const uint8_t* end) {
  if (end - p < 2) {
    p = end;
    return 0;
  }
  const uint16_t v = static_cast<uint16_t>(p[0] | (p[1] << 8));
  p += 2;
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("CAIRN_FUZZ_SEED_DIR")) {
    std::ofstream(std::string(dir) + "/real-session", std::ios::binary) << SeedScript();
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto standby = std::make_shared<MemoryPool>("rbd");
  auto kv = std::make_shared<MemoryKvStore>();
  SinkEnv env;
  env.site = "b";
  env.spools = std::make_shared<MemorySpoolStore>();
  env.pools = {"rbd"};
  env.open_pool = [&](const std::string& p) -> StatusOr<std::shared_ptr<Pool>> {
    if (p != "rbd") return NotFound("no pool " + p);
    return std::shared_ptr<Pool>(standby);
  };
  env.open_catalog = [&](const std::string&) -> StatusOr<std::shared_ptr<KvStore>> {
    return std::shared_ptr<KvStore>(kv);
  };
  env.timeouts.hello = 2s;
  env.timeouts.stall = 2s;
  env.timeouts.idle = 2s;
  env.retry_min = 1ms;
  env.retry_max = 1ms;
  {
    Sink sink(env);
    auto [source, sink_end] = MakeMemoryLinkPair(64u << 20);
    std::thread serve([&, l = std::move(sink_end)] { (void)sink.Serve(*l); });
    const uint8_t* p = data;
    const uint8_t* end = data + size;
    while (p < end) {
      const auto type = static_cast<FrameType>(*p++);
      const uint16_t body_len = std::min<uint16_t>(Get16(p, end), end - p);
      const std::string body(reinterpret_cast<const char*>(p), body_len);
      p += body_len;
      const uint16_t payload_len = std::min<uint16_t>(Get16(p, end), end - p);
      const std::span<const char> payload(reinterpret_cast<const char*>(p), payload_len);
      p += payload_len;
      if (!source->Send(type, body, payload).ok()) break;
    }
    source->Close();  // the sink sees the end of the stream
    serve.join();
  }
  // A point exists only with its standby snapshot.
  Catalog catalog(*kv);
  if (auto points = catalog.Points("vol"); points.ok()) {
    for (const RestorePoint& pt : *points) {
      auto vol = standby->Open(pt.image);
      if (!vol.ok()) __builtin_trap();
      auto snaps = (*vol)->ListSnaps();
      bool found = false;
      for (const auto& s : snaps.ok() ? *snaps : std::vector<SnapInfo>{})
        found |= s.name == pt.snap;
      if (!found) __builtin_trap();
    }
  }
  return 0;
}
