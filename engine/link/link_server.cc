#include "engine/link/link_server.h"

#include <spdlog/spdlog.h>

namespace cairn {

LinkServer::LinkServer(std::string name, std::unique_ptr<Listener> listener, ServeFn serve)
    : name_(std::move(name)), listener_(std::move(listener)), serve_(std::move(serve)) {}

LinkServer::~LinkServer() { Stop(); }

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
      auto session = std::make_unique<Session>();
      Session* s = session.get();
      s->link = link->get();
      s->thread = std::thread([this, s, l = std::move(link).value()]() mutable {
        serve_(*l);
        std::lock_guard lock(mu_);
        s->link = nullptr;
        s->done = true;
        // The sessions that ended before this one are joined now, not at
        // the next accept: an ended thread keeps its stack until it is
        // joined (a thousand replaced sessions held 50 MiB).
        if (!stopping_) Reap(s);
        // `l` is destroyed when this lambda's thread ends, after the link
        // pointer is gone from the table Stop() walks.
      });
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
