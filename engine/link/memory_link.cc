#include <fmt/format.h>

#include <condition_variable>
#include <deque>
#include <mutex>

#include "engine/link/link.h"

namespace cairn {
namespace {

// One direction of the pair: a byte queue with a bound.
struct Pipe {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> frames;  // encoded frames
  size_t bytes = 0;
  size_t capacity = 0;
  bool closed = false;
};

class MemoryLink final : public Link {
 public:
  MemoryLink(std::shared_ptr<Pipe> in, std::shared_ptr<Pipe> out, std::string peer)
      : in_(std::move(in)), out_(std::move(out)), peer_(std::move(peer)) {}
  ~MemoryLink() override { Close(); }

  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override {
    return Push(EncodeFrame(type, body, payload));
  }

  Status SendEncoded(std::string_view frame) override { return Push(frame); }

  Status Push(std::string_view bytes) {
    std::unique_lock lock(out_->mu);
    out_->cv.wait(lock, [&] {
      return out_->closed || out_->bytes == 0 || out_->bytes + bytes.size() <= out_->capacity;
    });
    if (out_->closed) return Aborted(fmt::format("link to {} is closed", peer_));
    out_->bytes += bytes.size();
    out_->frames.emplace_back(bytes);
    out_->cv.notify_all();
    return OkStatus();
  }

  StatusOr<Frame> Receive(std::chrono::milliseconds timeout) override {
    std::unique_lock lock(in_->mu);
    if (!in_->cv.wait_for(lock, timeout, [&] { return in_->closed || !in_->frames.empty(); })) {
      return Unavailable(fmt::format("no frame from {} within {} ms", peer_, timeout.count()));
    }
    if (in_->frames.empty()) return Aborted(fmt::format("link to {} is closed", peer_));
    std::string bytes = std::move(in_->frames.front());
    in_->frames.pop_front();
    in_->bytes -= bytes.size();
    in_->cv.notify_all();
    lock.unlock();
    StringSource src(bytes);
    return ReadFrame(src);
  }

  void Close() override {
    for (auto* p : {in_.get(), out_.get()}) {
      std::lock_guard lock(p->mu);
      p->closed = true;
      p->cv.notify_all();
    }
  }

  const std::string& peer() const override { return peer_; }

 private:
  std::shared_ptr<Pipe> in_, out_;
  std::string peer_;
};

}  // namespace

std::pair<std::unique_ptr<Link>, std::unique_ptr<Link>> MakeMemoryLinkPair(size_t capacity_bytes) {
  auto ab = std::make_shared<Pipe>();
  auto ba = std::make_shared<Pipe>();
  ab->capacity = ba->capacity = capacity_bytes;
  return {std::make_unique<MemoryLink>(ba, ab, "memory-peer-b"),
          std::make_unique<MemoryLink>(ab, ba, "memory-peer-a")};
}

}  // namespace cairn
