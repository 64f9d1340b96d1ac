// A queue that hands completed operations from library callback threads
// (librbd, librados) to the one thread that waits for them.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>

namespace cairn {

template <typename T>
class HandoffQueue {
 public:
  // From any thread; never blocks on the consumer. Notifies under the lock:
  // the consumer may destroy the queue as soon as it holds the last item,
  // so the producer must be done with the queue when the lock goes (a
  // notify after unlocking crashed cairnd once, on a destroyed queue).
  void Push(T item) {
    std::lock_guard lock(mu_);
    items_.push_back(std::move(item));
    cv_.notify_one();
  }
  // Blocks until an item is there.
  T Pop() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !items_.empty(); });
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> items_;
};

}  // namespace cairn
