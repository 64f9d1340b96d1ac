#include "engine/replication/group_source.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <set>

#include "engine/catalog/catalog.h"

namespace cairn {
namespace {

// The seq of "cairn.<N>" or of a group snapshot's share "group:cairn.<N>".
std::optional<uint64_t> InstantSeq(std::string_view name) {
  if (IsGroupSnapName(name)) name.remove_prefix(kGroupSnapPrefix.size());
  return ParseSnapName(name);
}

}  // namespace

GroupSource::GroupSource(std::string group, std::shared_ptr<Pool> pool,
                         std::chrono::milliseconds interval,
                         std::vector<std::shared_ptr<SourceReplicator>> members)
    : group_(std::move(group)),
      pool_(std::move(pool)),
      interval_(interval),
      members_(std::move(members)) {
  status_.group = group_;
  status_.pool = pool_->name();
  self_->group = this;
  // The members may outlive this group (held elsewhere, a call in
  // flight): their calls reach it only while it exists.
  for (const auto& m : members_) {
    status_.volumes.push_back(m->config().id);
    SourceReplicator::GroupMembership g;
    g.group = group_;
    g.members_at = [self = self_](uint64_t seq) -> uint32_t {
      std::shared_lock alive(self->mu);
      if (self->group == nullptr) return 0;  // no instant: the sink refuses the epoch
      std::lock_guard lock(self->group->mu_);
      auto it = self->group->members_at_.find(seq);
      return it != self->group->members_at_.end()
                 ? it->second
                 : static_cast<uint32_t>(self->group->members_.size());
    };
    g.request_now = [self = self_, name = group_]() -> StatusOr<uint64_t> {
      std::shared_lock alive(self->mu);
      if (self->group == nullptr) return Aborted(fmt::format("group {} is stopped", name));
      return self->group->RequestNow();
    };
    g.on_point = [self = self_, volume = m->config().id](uint64_t seq) {
      std::shared_lock alive(self->mu);
      if (self->group != nullptr) self->group->OnPoint(volume, seq);
    };
    m->set_group(std::move(g));
  }
}

GroupSource::~GroupSource() {
  Stop();
  std::unique_lock gone(self_->mu);  // waits for the members' calls in flight
  self_->group = nullptr;
}

void GroupSource::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void GroupSource::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

StatusOr<uint64_t> GroupSource::RequestNow() {
  // The next instant is taken after this call, so it holds every write
  // completed before it; it is numbered above every instant so far, those
  // a previous process took included: until this one took an instant,
  // they are known only from the members' snapshots.
  uint64_t listed = 0;
  bool known = false;
  {
    std::lock_guard lock(mu_);
    known = instant_seq_ > 0;
  }
  if (!known) {
    for (const auto& m : members_) {
      auto vol = pool_->Open(m->config().image);
      auto snaps = vol.ok() ? (*vol)->ListSnaps() : vol.status();
      if (!snaps.ok()) {
        return snaps.status().Annotate(
            fmt::format("group {}: no group point can be promised without the snapshots of {}",
                        group_, m->config().image));
      }
      for (const auto& s : *snaps) listed = std::max(listed, InstantSeq(s.name).value_or(0));
    }
  }
  std::lock_guard lock(mu_);
  if (stop_) return Aborted("cairnd stops");
  wanted_seq_ = std::max({wanted_seq_, instant_seq_ + 1, listed + 1, taking_seq_ + 1});
  cv_.notify_all();
  return wanted_seq_;
}

GroupStatusInfo GroupSource::Report() const {
  std::lock_guard lock(mu_);
  GroupStatusInfo s = status_;
  for (const auto& m : members_) {
    auto it = points_.find(m->config().id);
    if (instant_seq_ > 0 && (it == points_.end() || it->second < instant_seq_)) {
      s.waiting_for.push_back(m->config().id);
    }
  }
  return s;
}

void GroupSource::OnPoint(const std::string& volume, uint64_t seq) {
  std::lock_guard lock(mu_);
  points_[volume] = std::max(points_[volume], seq);
  if (points_.size() == members_.size()) {
    uint64_t whole = UINT64_MAX;
    for (const auto& [v, s] : points_) whole = std::min(whole, s);
    status_.last_seq = whole;
    auto t = taken_at_ns_.find(whole);
    status_.last_time_ns = t != taken_at_ns_.end() ? t->second : 0;
  }
  cv_.notify_all();
}

bool GroupSource::AllPointsMade() const {
  if (instant_seq_ == 0) return true;
  return std::all_of(members_.begin(), members_.end(), [&](const auto& m) {
    auto it = points_.find(m->config().id);
    return it != points_.end() && it->second >= instant_seq_;
  });
}

Status GroupSource::CheckMembers() {
  auto listed = pool_->GroupImages(group_);
  if (!listed.ok()) {
    return listed.status().Annotate(
        fmt::format("the images of group {} in pool {}", group_, pool_->name()));
  }
  const std::vector<std::string> images = std::move(listed).value();
  std::vector<std::string> ours;
  for (const auto& m : members_) ours.push_back(m->config().image);
  std::sort(ours.begin(), ours.end());
  if (images == ours) return OkStatus();
  std::vector<std::string> unreplicated;
  std::vector<std::string> outside;
  std::set_difference(images.begin(), images.end(), ours.begin(), ours.end(),
                      std::back_inserter(unreplicated));
  std::set_difference(ours.begin(), ours.end(), images.begin(), images.end(),
                      std::back_inserter(outside));
  return FailedPrecondition(fmt::format(
      "group {} in pool {}: images [{}] are in the group but no volume of the group replicates "
      "them, and images [{}] are replicated as members but not in the group (`rbd group image "
      "add {}/{} POOL/IMAGE`): no instant is taken until the two agree",
      group_, pool_->name(), fmt::join(unreplicated, ", "), fmt::join(outside, ", "), pool_->name(),
      group_));
}

StatusOr<uint64_t> GroupSource::NextSeq(std::vector<std::vector<SnapInfo>>* listed) {
  uint64_t seq = 0;
  {
    std::lock_guard lock(mu_);
    seq = std::max(instant_seq_, failed_seq_);
  }
  // Numbered above every snapshot of every member and every point its sink
  // has: a member that replicated on its own before has points of its own
  // numbers, and one whose snapshots are gone still must ship above them.
  for (const auto& m : members_) {
    seq = std::max(seq, m->Report().last_seq);
    ASSIGN_OR_RETURN(auto vol, pool_->Open(m->config().image));
    ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
    for (const auto& s : snaps) seq = std::max(seq, InstantSeq(s.name).value_or(0));
    listed->push_back(std::move(snaps));
  }
  return seq + 1;
}

StatusOr<std::vector<ImageGate::Token>> GroupSource::MemberPasses() {
  // No instant while a sink (another site's, or this one's taking it)
  // writes any member: the group stands by with it. Every member is
  // asked, so that each one's state says whether it stands by.
  std::vector<ImageGate::Token> passes;
  Status refused;
  for (const auto& m : members_) {
    auto pass = m->SnapshotPass();
    if (pass.ok()) {
      passes.push_back(std::move(pass).value());
    } else if (refused.ok()) {
      refused = pass.status();
    }
  }
  RETURN_IF_ERROR(refused);
  return passes;
}

StatusOr<uint64_t> GroupSource::TakeInstant() {
  std::lock_guard one(instant_mu_);
  RETURN_IF_ERROR(CheckMembers());
  ASSIGN_OR_RETURN(const std::vector<ImageGate::Token> passes, MemberPasses());
  std::vector<std::vector<SnapInfo>> listed;
  ASSIGN_OR_RETURN(const uint64_t seq, NextSeq(&listed));
  {
    // A RequestNow from here on may come after writes this instant misses:
    // it promises the next one.
    std::lock_guard lock(mu_);
    taking_seq_ = seq;
  }
  struct Taken {
    GroupSource* g;
    ~Taken() {
      std::lock_guard lock(g->mu_);
      g->taking_seq_ = 0;
    }
  } taken_done{this};
  // Each member's own cairn.<seq> first: the next instant diffs from it,
  // and it is older than this instant, so that diff misses nothing.
  std::vector<std::string> taken;
  Status st;
  for (const auto& m : members_) {
    auto vol = pool_->Open(m->config().image);
    st = vol.ok() ? (*vol)->CreateSnap(SnapName(seq)) : vol.status();
    if (!st.ok()) break;
    taken.push_back(m->config().image);
  }
  if (st.ok()) st = pool_->CreateGroupSnap(group_, SnapName(seq));
  // An image added to or removed from the store's group meanwhile: some
  // member has no share of this instant (or an image not replicated has
  // one), and the instant is no group point. Taken again next time.
  if (st.ok()) st = CheckMembers();
  if (!st.ok()) {
    // Never numbered again: a group snapshot that failed half way may
    // still hold its name in the store until it is removed.
    {
      std::lock_guard lock(mu_);
      failed_seq_ = std::max(failed_seq_, seq);
    }
    if (Status rm = pool_->RemoveGroupSnap(group_, SnapName(seq));
        !rm.ok() && rm.code() != Code::kNotFound) {
      spdlog::warn("group {}: removing group snapshot {} of the failed instant: {}", group_,
                   SnapName(seq), rm.ToString());
    }
    for (const auto& image : taken) {
      auto vol = pool_->Open(image);
      Status rm = vol.ok() ? (*vol)->RemoveSnap(SnapName(seq)) : vol.status();
      if (!rm.ok()) {
        spdlog::warn("group {}: {}@{} of the failed instant stays (never shipped): {}", group_,
                     image, SnapName(seq), rm.ToString());
      }
    }
    return st.Annotate(fmt::format("group {}: instant {}", group_, seq));
  }
  {
    std::lock_guard lock(mu_);
    instant_seq_ = seq;
    members_at_[seq] = static_cast<uint32_t>(members_.size());
    taken_at_ns_[seq] = clock_->UnixNs();
    while (members_at_.size() > 64) members_at_.erase(members_at_.begin());
    while (taken_at_ns_.size() > 64) taken_at_ns_.erase(taken_at_ns_.begin());
    status_.instant_seq = seq;
    status_.instant_time_ns = taken_at_ns_[seq];
    status_.instants_total += 1;
    status_.error.clear();
  }
  for (const auto& m : members_) m->ShipInstant(seq);
  PruneGroupSnaps(listed);
  return seq;
}

void GroupSource::PruneGroupSnaps(const std::vector<std::vector<SnapInfo>>& listed) {
  std::set<uint64_t> shares;
  std::set<uint64_t> bases;  // a member still has its cairn.<N>
  for (const auto& snaps : listed) {
    for (const auto& s : snaps) {
      auto seq = InstantSeq(s.name);
      if (!seq) continue;
      (IsGroupSnapName(s.name) ? shares : bases).insert(*seq);
    }
  }
  for (uint64_t seq : shares) {
    if (bases.contains(seq)) continue;
    if (Status st = pool_->RemoveGroupSnap(group_, SnapName(seq));
        !st.ok() && st.code() != Code::kNotFound) {
      spdlog::warn("group {}: removing group snapshot {}: {}", group_, SnapName(seq),
                   st.ToString());
    }
  }
}

bool GroupSource::AnyChanged() {
  uint64_t seq = 0;
  {
    std::lock_guard lock(mu_);
    seq = instant_seq_;
  }
  if (seq == 0) return true;
  const std::string share = GroupSnapName(SnapName(seq));
  for (const auto& m : members_) {
    auto vol = pool_->Open(m->config().image);
    if (!vol.ok()) return true;
    auto snaps = (*vol)->ListSnaps();
    if (!snaps.ok()) return true;
    auto it = std::find_if(snaps->begin(), snaps->end(),
                           [&](const SnapInfo& s) { return s.name == share; });
    if (it == snaps->end()) return true;
    auto changed = (*vol)->ChangedSince(*it);
    if (!changed.ok() || *changed) return true;
  }
  return false;
}

void GroupSource::Loop() {
  const bool periodic = interval_.count() > 0;
  auto next = clock_->Now();
  auto backoff = std::chrono::milliseconds(500);
  std::string last_error;
  std::unique_lock lock(mu_);
  while (!stop_) {
    const bool asked = wanted_seq_ > instant_seq_;
    const bool due = asked || (periodic && clock_->Now() >= next);
    // The next instant waits for every member's point of the last one.
    if (!due || !AllPointsMade()) {
      clock_->WaitUntil(lock, cv_, due || !periodic ? Clock::kForever : next);
      continue;
    }
    lock.unlock();
    const int64_t asked_at = clock_->UnixNs();  // what was written before is seen
    const bool take = asked || AnyChanged();
    StatusOr<uint64_t> r = take ? TakeInstant() : StatusOr<uint64_t>(uint64_t{0});
    if (!take) {
      // Idle: every member still holds the newest instant's point.
      for (const auto& m : members_) m->NoteUnchanged(asked_at);
    }
    lock.lock();
    if (!take) status_.unchanged_at_ns = asked_at;
    if (r.ok()) {
      backoff = std::chrono::milliseconds(500);
      last_error.clear();
      next = clock_->Now() + interval_;
      continue;
    }
    status_.error = r.status().ToString();
    if (status_.error != last_error) spdlog::error("group {}: {}", group_, status_.error);
    last_error = status_.error;
    next = clock_->Now() + backoff;
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30'000));
    // A request waits for the retry too.
    clock_->WaitUntil(lock, cv_, next, [&] { return stop_; });
  }
}

}  // namespace cairn
