#include "engine/base/clock.h"

#include <algorithm>

namespace cairn {
namespace {

class SystemClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }

  int64_t UnixNs() const override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  bool WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                 TimePoint deadline) override {
    if (deadline == kForever) {
      cv.wait(lock);
      return true;
    }
    return cv.wait_until(lock, deadline) == std::cv_status::no_timeout || Now() < deadline;
  }
};

}  // namespace

Clock& RealClock() {
  static SystemClock* const clock = new SystemClock;
  return *clock;
}

ManualClock::ManualClock(int64_t unix_ns) : unix_start_ns_(unix_ns) {}

Clock::TimePoint ManualClock::Now() const {
  std::lock_guard lock(mu_);
  return TimePoint(since_start_);
}

int64_t ManualClock::UnixNs() const {
  std::lock_guard lock(mu_);
  return unix_start_ns_ +
         std::chrono::duration_cast<std::chrono::nanoseconds>(since_start_ - std::chrono::hours(1))
             .count();
}

bool ManualClock::WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                            TimePoint deadline) {
  // The caller holds its mutex from here until cv.wait releases it, and
  // Advance takes that mutex before it notifies: an Advance after the
  // check below cannot notify before this thread waits.
  Waiter self{lock.mutex(), &cv, deadline};
  {
    std::lock_guard g(mu_);
    if (TimePoint(since_start_) >= deadline) return false;
    waiters_.push_back(&self);
  }
  waiters_changed_.notify_all();
  cv.wait(lock);
  std::lock_guard g(mu_);
  // Still listed if woken by its own condition, not by Advance.
  if (auto it = std::find(waiters_.begin(), waiters_.end(), &self); it != waiters_.end()) {
    waiters_.erase(it);
  }
  return TimePoint(since_start_) < deadline;
}

void ManualClock::Advance(Duration d) {
  std::vector<Waiter> wake;
  {
    std::lock_guard g(mu_);
    since_start_ += d;
    const TimePoint now(since_start_);
    std::erase_if(waiters_, [&](const Waiter* w) {
      if (w->deadline > now) return false;
      wake.push_back(*w);
      return true;
    });
  }
  for (const Waiter& w : wake) {
    std::lock_guard g(*w.mu);
    w.cv->notify_all();
  }
}

bool ManualClock::AwaitDeadlines(size_t n, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mu_);
  return waiters_changed_.wait_for(lock, timeout, [&] {
    return static_cast<size_t>(std::count_if(waiters_.begin(), waiters_.end(), [](const Waiter* w) {
             return w->deadline != kForever;
           })) >= n;
  });
}

}  // namespace cairn
