// MemoryBudget: the buffer memory one cairnd lends to its epochs in flight,
// shared by all its volumes, so that the daemon's memory is bounded by its
// configuration ([cairnd] memory_budget), not by how many volumes sync at
// once. A source epoch borrows its read window, a sink epoch its apply
// window and spool buffers; an epoch that cannot have what it wants runs
// with less (down to its minimum: one block), or waits for it.
//
// Thread-safety: every method from any thread.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>

namespace cairn {

class MemoryBudget {
 public:
  // What one epoch holds; returned when it goes.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& o) noexcept : budget_(std::exchange(o.budget_, nullptr)), bytes_(o.bytes_) {}
    Lease& operator=(Lease&& o) noexcept {
      if (this != &o) {
        Release();
        budget_ = std::exchange(o.budget_, nullptr);
        bytes_ = o.bytes_;
      }
      return *this;
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { Release(); }
    uint64_t bytes() const { return bytes_; }

   private:
    friend class MemoryBudget;
    Lease(MemoryBudget* b, uint64_t n) : budget_(b), bytes_(n) {}
    void Release() {
      if (budget_ != nullptr) budget_->Return(bytes_);
      budget_ = nullptr;
    }
    MemoryBudget* budget_ = nullptr;
    uint64_t bytes_ = 0;
  };

  explicit MemoryBudget(uint64_t bytes) : total_(bytes), free_(bytes) {}
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Waits until at least `min` bytes are free (all of the budget, if `min`
  // exceeds it), then takes as much as is free, up to `want`. Returns
  // nullopt if `cancelled` says so first; it is asked again on every Wake().
  // REQUIRES: min <= want.
  std::optional<Lease> Acquire(uint64_t want, uint64_t min,
                               const std::function<bool()>& cancelled) {
    min = std::min(min, total_);
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return free_ >= min || cancelled(); });
    if (free_ < min) return std::nullopt;
    const uint64_t n = std::min(want, free_);
    free_ -= n;
    peak_ = std::max(peak_, total_ - free_);
    return Lease(this, n);
  }

  // Makes waiters ask their `cancelled` again (a stopping daemon).
  void Wake() {
    std::lock_guard lock(mu_);
    cv_.notify_all();
  }

  uint64_t total() const { return total_; }
  uint64_t in_use() const {
    std::lock_guard lock(mu_);
    return total_ - free_;
  }
  uint64_t peak() const {
    std::lock_guard lock(mu_);
    return peak_;
  }

 private:
  void Return(uint64_t n) {
    std::lock_guard lock(mu_);
    free_ += n;
    cv_.notify_all();
  }

  const uint64_t total_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t free_;
  uint64_t peak_ = 0;
};

}  // namespace cairn
