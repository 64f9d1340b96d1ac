#include "engine/link/link_server.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace cairn {

std::string PeerAddress(const std::string& peer) {
  const auto colon = peer.rfind(':');
  if (colon == std::string::npos || peer.find('/') != std::string::npos) return peer;
  return peer.substr(0, colon);
}

LinkServer::LinkServer(std::string name, std::unique_ptr<Listener> listener, ServeFn serve,
                       LinkServerLimits limits)
    : name_(std::move(name)),
      listener_(std::move(listener)),
      serve_(std::move(serve)),
      limits_(limits) {}

LinkServer::~LinkServer() { Stop(); }

uint64_t LinkServer::refused() const {
  std::lock_guard lock(mu_);
  return refused_;
}

void LinkServer::Reap(const Session* self) {
  // REQUIRES: mu_ held.
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if ((*it)->done && it->get() != self) {
      (*it)->thread.join();
      it = sessions_.erase(it);
    } else {
      ++it;
    }
  }
}

std::string LinkServer::OverLimitLocked(const std::string& address) const {
  if (sessions_.size() >= limits_.max_sessions) {
    return fmt::format("{} connections are open, the most this server takes", limits_.max_sessions);
  }
  if (auto it = handshaking_.find(address);
      it != handshaking_.end() && it->second >= limits_.max_handshakes_per_address) {
    return fmt::format("{} connections from {} have not finished their handshake", it->second,
                       address);
  }
  return "";
}

// One line a second at most: a flood must not fill the log.
void LinkServer::LogRefusalLocked(const std::string& peer, const std::string& why) {
  ++refused_;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_refusal_log_ < std::chrono::seconds(1)) {
    ++refused_unlogged_;
    return;
  }
  last_refusal_log_ = now;
  spdlog::warn("{}: closed the connection from {} at once: {}{}", name_, peer, why,
               refused_unlogged_
                   ? fmt::format(" ({} more refused since the last report)", refused_unlogged_)
                   : "");
  refused_unlogged_ = 0;
}

void LinkServer::RunSession(Session* s, std::unique_ptr<Link> link, std::string address) {
  const Status hs = link->Handshake();
  {
    std::lock_guard lock(mu_);
    if (--handshaking_[address] == 0) handshaking_.erase(address);
  }
  if (hs.ok()) {
    serve_(*link);
  } else {
    spdlog::warn("{}: refused {}: {}", name_, link->peer(), hs.ToString());
  }
  std::lock_guard lock(mu_);
  s->link = nullptr;
  s->done = true;
  // The sessions that ended before this one are joined now, not at the
  // next accept: an ended thread keeps its stack until it is joined (a
  // thousand replaced sessions held 50 MiB).
  if (!stopping_) Reap(s);
  // `link` is destroyed when this thread's function returns, after the
  // link pointer is gone from the table Stop() walks.
}

void LinkServer::Start() {
  accept_thread_ = std::thread([this] {
    while (true) {
      auto link = listener_->Accept();
      std::lock_guard lock(mu_);
      if (stopping_) return;
      if (!link.ok()) {
        spdlog::warn("{}: accept failed: {}", name_, link.status().ToString());
        continue;
      }
      Reap();
      std::string address = PeerAddress((*link)->peer());
      if (std::string why = OverLimitLocked(address); !why.empty()) {
        LogRefusalLocked((*link)->peer(), why);
        continue;  // the link closes as it goes
      }
      ++handshaking_[address];
      auto session = std::make_unique<Session>();
      Session* s = session.get();
      s->link = link->get();
      s->thread = std::thread(&LinkServer::RunSession, this, s, std::move(link).value(),
                              std::move(address));
      sessions_.push_back(std::move(session));
    }
  });
}

void LinkServer::Stop() {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    for (auto& s : sessions_) {
      if (s->link) s->link->Close();
    }
  }
  listener_->Close();
  if (accept_thread_.joinable()) accept_thread_.join();
  for (auto& s : sessions_) s->thread.join();
  sessions_.clear();
}

}  // namespace cairn
