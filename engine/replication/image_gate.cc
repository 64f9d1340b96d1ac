#include "engine/replication/image_gate.h"

#include <fmt/format.h>

namespace cairn {
namespace {

// Counts `key` down in `counts`, forgetting it at zero.
void Release(std::map<std::string, int>& counts, const std::string& key) {
  auto it = counts.find(key);
  if (it != counts.end() && --it->second == 0) counts.erase(it);
}

}  // namespace

StatusOr<ImageGate::Token> ImageGate::BeginSnapshot(const std::string& pool,
                                                    const std::string& image) {
  std::string key = pool + "/" + image;
  {
    std::lock_guard lock(state_->mu);
    if (state_->held.contains(key)) {
      return FailedPrecondition(fmt::format(
          "{} is being taken by this site's sink (the volume failed over to another site, which "
          "replicates it back here): no snapshot of it is taken from here",
          key));
    }
    ++state_->taking[key];
  }
  return Token(nullptr, [state = state_, key = std::move(key)](void*) {
    std::lock_guard lock(state->mu);
    Release(state->taking, key);
    state->cv.notify_all();
  });
}

ImageGate::Token ImageGate::Hold(const std::string& pool, const std::string& image) {
  std::string key = pool + "/" + image;
  std::unique_lock lock(state_->mu);
  ++state_->held[key];
  state_->cv.wait(lock, [&] { return !state_->taking.contains(key); });
  return Token(nullptr, [state = state_, key = std::move(key)](void*) {
    std::lock_guard lock(state->mu);
    Release(state->held, key);
  });
}

}  // namespace cairn
