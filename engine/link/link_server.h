// LinkServer: accepts connections on a Listener and serves each on its own
// thread with a caller-given function. Used for the sink's TCP port and
// for the control socket.
//
// A connection is served only after its handshake (Link::Handshake: TLS
// on the sink's port), which runs on the connection's own thread. Before
// that, a peer gets no thread beyond the limits below: a flood of
// connections that never authenticate is closed at accept.
//
// Thread-safety: Start/Stop from one thread; `serve` runs concurrently on
// many threads and must be thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/link/link.h"
#include "engine/link/tcp_link.h"

namespace cairn {

struct LinkServerLimits {
  // Connections served at once, all peers together (a thread each).
  size_t max_sessions = 4096;
  // Connections at once from one address that have not finished their
  // handshake.
  size_t max_handshakes_per_address = 8;
};

class LinkServer {
 public:
  using ServeFn = std::function<void(Link&)>;
  LinkServer(std::string name, std::unique_ptr<Listener> listener, ServeFn serve,
             LinkServerLimits limits = {});
  ~LinkServer();
  void Start();
  // Closes the listener and every open link, then joins all threads.
  void Stop();
  uint16_t port() const { return listener_->port(); }
  // Connections closed at accept because a limit was reached.
  uint64_t refused() const;

 private:
  struct Session {
    std::thread thread;
    Link* link;
    bool done = false;
  };
  // Joins finished session threads but `self` (the caller's own).
  void Reap(const Session* self = nullptr);
  // Why `link` may not have a session now, or "" (mu_ held).
  std::string OverLimitLocked(const std::string& address) const;
  void LogRefusalLocked(const std::string& peer, const std::string& why);
  void RunSession(Session* s, std::unique_ptr<Link> link, std::string address);

  const std::string name_;
  std::unique_ptr<Listener> listener_;
  ServeFn serve_;
  const LinkServerLimits limits_;
  std::thread accept_thread_;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Session>> sessions_;
  std::map<std::string, size_t> handshaking_;  // by peer address
  uint64_t refused_ = 0;
  uint64_t refused_unlogged_ = 0;
  std::chrono::steady_clock::time_point last_refusal_log_{};
  bool stopping_ = false;
};

// The address part of a peer name "host:port" (the whole name otherwise).
std::string PeerAddress(const std::string& peer);

}  // namespace cairn
