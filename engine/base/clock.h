// Clock: the seam through which Cairn reads time and waits for it.
//
// Two implementations: RealClock() (steady_clock for intervals, deadlines
// and durations; the system clock for the unix times stamped on points and
// shown as lag) and ManualClock, whose time moves only when a test says so.
// Engine code that schedules (the source's interval, the sink's retry
// backoff, lag) reads and waits through a Clock, so a test of a schedule
// advances time instead of sleeping on the wall clock.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

namespace cairn {

class Clock {
 public:
  using Duration = std::chrono::steady_clock::duration;
  using TimePoint = std::chrono::steady_clock::time_point;
  // No deadline: wait until notified.
  static constexpr TimePoint kForever = TimePoint::max();

  virtual ~Clock() = default;

  // Monotonic time: for intervals, deadlines and durations.
  virtual TimePoint Now() const = 0;
  // Unix time in nanoseconds: for what is stamped (points) and shown (lag).
  virtual int64_t UnixNs() const = 0;

  // Blocks on `cv`, whose mutex `lock` holds, until it is notified or
  // `deadline` has passed; may also return spuriously (callers loop on
  // their condition). Returns false once `deadline` has passed (at once if
  // it had already).
  virtual bool WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                         TimePoint deadline) = 0;

  // Waits as above until `pred()` holds (true) or `deadline` passes with it
  // still false (false). `pred` is called with the lock held.
  template <typename Pred>
  bool WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                 TimePoint deadline, Pred pred) {
    while (!pred()) {
      if (!WaitUntil(lock, cv, deadline)) return pred();
    }
    return true;
  }

  double SecondsSince(TimePoint start) const {
    return std::chrono::duration<double>(Now() - start).count();
  }
};

// The machine's clocks. One shared instance; never destroyed.
Clock& RealClock();

// Time that moves only by Advance(). For tests of schedules: the code under
// test waits through WaitUntil; the test waits (on the real clock, with a
// deadline) until the expected number of threads is parked on the clock,
// then advances it past their deadlines.
class ManualClock final : public Clock {
 public:
  // Starts at an arbitrary monotonic time and at `unix_ns`.
  explicit ManualClock(int64_t unix_ns = int64_t{1'800'000'000} * 1'000'000'000);
  ManualClock(const ManualClock&) = delete;
  ManualClock& operator=(const ManualClock&) = delete;

  TimePoint Now() const override;
  int64_t UnixNs() const override;
  bool WaitUntil(std::unique_lock<std::mutex>& lock, std::condition_variable& cv,
                 TimePoint deadline) override;
  using Clock::WaitUntil;

  // Moves both times forward by `d` and wakes the threads whose deadline
  // has come (each re-checks its own condition).
  // REQUIRES: the mutexes and condition variables of the threads waiting
  // now outlive the call.
  void Advance(Duration d);

  // Blocks until at least `n` threads wait on this clock for a deadline
  // still to come (threads that wait without one are not counted). False
  // if that did not happen within `timeout` of real time. A test calls it
  // before Advance so that the time moves while the code under test is
  // parked, not while it computes its next deadline.
  bool AwaitDeadlines(size_t n, std::chrono::milliseconds timeout) const;

 private:
  struct Waiter {
    std::mutex* mu;
    std::condition_variable* cv;
    TimePoint deadline;
  };

  mutable std::mutex mu_;
  mutable std::condition_variable waiters_changed_;
  Duration since_start_{std::chrono::hours(1)};
  const int64_t unix_start_ns_;
  std::vector<Waiter*> waiters_;  // blocked (Advance drops those it wakes)
};

}  // namespace cairn
