// LinkServer: accepts connections on a Listener and serves each on its own
// thread with a caller-given function. Used for the sink's TCP port and
// for the control socket.
//
// Thread-safety: Start/Stop from one thread; `serve` runs concurrently on
// many threads and must be thread-safe.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/link/link.h"
#include "engine/link/tcp_link.h"

namespace cairn {

class LinkServer {
 public:
  using ServeFn = std::function<void(Link&)>;
  LinkServer(std::string name, std::unique_ptr<Listener> listener, ServeFn serve);
  ~LinkServer();
  void Start();
  // Closes the listener and every open link, then joins all threads.
  void Stop();
  uint16_t port() const { return listener_->port(); }

 private:
  struct Session {
    std::thread thread;
    Link* link;
    bool done = false;
  };
  // Joins finished session threads but `self` (the caller's own).
  void Reap(const Session* self = nullptr);

  const std::string name_;
  std::unique_ptr<Listener> listener_;
  ServeFn serve_;
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::unique_ptr<Session>> sessions_;
  bool stopping_ = false;
};

}  // namespace cairn
