// libFuzzer target: the source's reading of what a sink answers (its
// HelloReply, EpochAcks, LinkErrors, and anything else a lying or broken
// sink may send). The input is a script of frames, each
//   [u8 type][u16 body length][body][u16 payload length][payload]
// that a scripted link hands to SourceReplicator::RunOnce as the sink's
// replies (then the link ends); what the source sends goes nowhere. The
// source must fail with an error or finish, never crash or hang, and never
// record a point the sink did not confirm with the chain it computed.
//
// Seeds: with CAIRN_FUZZ_SEED_DIR set, the target writes there a sink's
// answers to a first epoch (HelloReply, DURABLE and APPLIED acks).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <memory>
#include <string>

#include "engine/link/link.h"
#include "engine/replication/replication.h"
#include "engine/replication/source.h"
#include "engine/volume/memory_volume.h"
#include "proto/cairn.pb.h"

namespace {

using namespace cairn;
using namespace std::chrono_literals;

// A link whose peer says the frames of a script, then hangs up.
class ScriptedLink final : public Link {
 public:
  explicit ScriptedLink(std::deque<Frame> frames) : frames_(std::move(frames)) {}
  Status Send(FrameType, std::string_view, std::span<const char>) override { return OkStatus(); }
  StatusOr<Frame> Receive(std::chrono::milliseconds) override {
    if (frames_.empty()) return Aborted("the scripted sink hung up");
    Frame f = std::move(frames_.front());
    frames_.pop_front();
    return f;
  }
  void Close() override {}
  const std::string& peer() const override { return peer_; }

 private:
  std::deque<Frame> frames_;
  const std::string peer_ = "scripted-sink";
};

void Put(std::string& s, FrameType type, const std::string& body) {
  s.push_back(static_cast<char>(type));
  s.push_back(static_cast<char>(body.size() & 0xff));
  s.push_back(static_cast<char>(body.size() >> 8));
  s.append(body);
  s.append(2, '\0');  // no payload
}

std::string SeedScript() {
  std::string s;
  pb::HelloReply hello;
  hello.set_protocol_version(kProtocolVersion);
  hello.set_last_chain(std::string(16, '\0'));
  hello.set_sink_site("b");
  hello.set_takes_unchanged(true);
  Put(s, FrameType::kHelloReply, hello.SerializeAsString());
  pb::EpochAck ack;
  ack.set_seq(1);
  ack.set_stage(pb::EpochAck::DURABLE);
  Put(s, FrameType::kEpochAck, ack.SerializeAsString());
  ack.set_stage(pb::EpochAck::APPLIED);
  ack.set_chain_digest(std::string(16, '\x5a'));
  Put(s, FrameType::kEpochAck, ack.SerializeAsString());
  return s;
}

std::deque<Frame> Parse(const uint8_t* p, const uint8_t* end) {
  std::deque<Frame> frames;
  auto get16 = [&]() -> size_t {
    if (end - p < 2) {
      p = end;
      return 0;
    }
    const size_t v = p[0] | (p[1] << 8);
    p += 2;
    return std::min<size_t>(v, end - p);
  };
  while (p < end) {
    Frame f;
    f.type = static_cast<FrameType>(*p++);
    const size_t body = get16();
    f.body.assign(reinterpret_cast<const char*>(p), body);
    p += body;
    const size_t payload = get16();
    f.payload.assign(p, p + payload);
    p += payload;
    frames.push_back(std::move(f));
  }
  return frames;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("CAIRN_FUZZ_SEED_DIR")) {
    std::ofstream(std::string(dir) + "/sink-answers", std::ios::binary) << SeedScript();
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto pool = std::make_shared<MemoryPool>("rbd");
  (void)pool->Create("img", 256 * 1024);
  VolumeConfig c;
  c.id = "vol";
  c.image = "img";
  c.target_pool = "rbd";
  c.target_image = "img-standby";
  c.interval = 0ms;
  c.block_size = 64 * 1024;
  LinkTimeouts t;
  t.hello = t.stall = t.ack = t.idle = 100ms;
  SourceReplicator source(
      c, "a", pool,
      [&]() -> StatusOr<std::unique_ptr<Link>> {
        return std::unique_ptr<Link>(new ScriptedLink(Parse(data, data + size)));
      },
      t);
  auto sent = source.RunOnce();
  // A sink that never confirmed with the right chain cannot have made the
  // source count a point: the chain of seq 1 is not 0x5a...
  if (sent.ok() && source.Report().last_seq != sent->id.seq) __builtin_trap();
  source.Disconnect();
  return 0;
}
