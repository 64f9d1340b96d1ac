// SourceReplicator: `cairn verify`. Both sites hash the same restore point
// grain by grain, the sink its snapshot of the point, this site the
// snapshot cairn.<seq> the point came from, and only the digests travel.
// The sink reads a window while this side reads the same one (the request
// goes first), so a verify takes about as long as reading the image once.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "engine/epoch/block_digests.h"
#include "engine/replication/digest_link.h"
#include "engine/replication/source.h"
#include "proto/cairn.pb.h"

namespace cairn {

StatusOr<uint64_t> SourceReplicator::StartVerify(uint64_t seq, bool repair) {
  std::lock_guard start_lock(verify_mu_);
  {
    std::lock_guard lock(mu_);
    const VerifyStatusInfo& v = status_.verify;
    if (v.running) {
      return AlreadyExists(
          fmt::format("volume '{}': a verify of restore point {} runs ({} of {} bytes)", config_.id,
                      v.seq, v.done_bytes, v.total_bytes));
    }
    if (seq == 0) seq = status_.last_seq;
    if (seq == 0) {
      return FailedPrecondition(
          fmt::format("volume '{}' has no restore point to verify yet", config_.id));
    }
    if (stop_) return Aborted("stopping");
  }
  if (verify_thread_.joinable()) verify_thread_.join();  // the last one, ended
  std::lock_guard lock(mu_);
  VerifyStatusInfo& v = status_.verify;
  v = VerifyStatusInfo{};
  v.id = ++verify_ids_;
  v.seq = seq;
  v.running = true;
  v.grain = kDigestGrain;
  v.repair = repair;
  verify_thread_ = std::thread([this, seq, repair] { RunVerify(seq, repair); });
  return v.id;
}

Status SourceReplicator::RequestRepair() {
  {
    std::lock_guard lock(mu_);
    repair_ = true;
  }
  return RequestNow().status();
}

void SourceReplicator::RunVerify(uint64_t seq, bool repair) {
  const auto t0 = clock_->Now();
  verify_pin_.store(seq, std::memory_order_relaxed);
  const Status result = Verify(seq);
  verify_pin_.store(0, std::memory_order_relaxed);
  bool mismatch = false;
  {
    std::lock_guard lock(mu_);
    VerifyStatusInfo& v = status_.verify;
    v.running = false;
    v.seconds = clock_->SecondsSince(t0);
    if (!result.ok()) {
      v.error = result.ToString();
      v.repair = false;
    } else {
      mismatch = v.mismatched_grains > 0;
      if (!mismatch) v.repair = false;
    }
  }
  if (!result.ok()) {
    spdlog::error("volume {}: verify of restore point {} failed: {}", config_.id, seq,
                  result.ToString());
    return;
  }
  if (mismatch && repair) {
    if (Status st = RequestRepair(); !st.ok()) {
      std::lock_guard lock(mu_);
      status_.verify.error = "the repair could not be asked for: " + st.ToString();
    }
  }
}

Status SourceReplicator::Verify(uint64_t seq) {
  ASSIGN_OR_RETURN(auto vol, pool_->Open(config_.image));
  ASSIGN_OR_RETURN(const auto snaps, vol->ListSnaps());
  const std::string name = PointSnapName(seq);
  auto it =
      std::find_if(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == name; });
  if (it == snaps.end()) {
    return FailedPrecondition(fmt::format(
        "{}/{} has no snapshot {} any more: only the points whose source snapshot this site keeps "
        "can be verified (the newest, and older ones by keep_snapshots, snapshot_retention)",
        config_.pool, config_.image, name));
  }
  const SnapInfo snap = *it;
  ASSIGN_OR_RETURN(auto link, connect_());
  {
    std::lock_guard lock(mu_);
    if (stop_) return Aborted("cairnd stops");
    verify_link_ = link.get();  // RequestStop closes it
  }
  struct Forget {
    SourceReplicator* r;
    ~Forget() {
      std::lock_guard lock(r->mu_);
      r->verify_link_ = nullptr;
    }
  } forget{this};
  ASSIGN_OR_RETURN(const SinkHello hello, Handshake(*link, false, 0, seq));
  if (!hello.serves_verify) {
    return FailedPrecondition(
        fmt::format("the sink at {} does not take verifies: upgrade its cairnd", link->peer()));
  }
  if (hello.last_point_time_ns != 0 && hello.last_point_time_ns != snap.time_ns) {
    return FailedPrecondition(fmt::format(
        "restore point {} of '{}' came from a snapshot taken at {} ns; {}@{} here was taken at {} "
        "ns: another history (a recreated image), nothing to compare",
        seq, config_.id, hello.last_point_time_ns, config_.image, name, snap.time_ns));
  }
  {
    std::lock_guard lock(mu_);
    status_.verify.total_bytes = snap.size;
  }
  spdlog::info("volume {}: verifying restore point {} at site '{}' against {}@{} ({} bytes)",
               config_.id, seq, hello.site, config_.image, name, snap.size);
  {
    ASSIGN_OR_RETURN(auto io, vol->OpenIo(snap.name));
    RETURN_IF_ERROR(CompareAll(*link, *io, seq, snap.size));
  }
  RETURN_IF_ERROR(vol->ConfirmSnap(snap.name, snap.id).Annotate("the snapshot verified"));
  VerifyStatusInfo found;
  {
    std::lock_guard lock(mu_);
    found = status_.verify;
  }
  pb::VerifyEnd end;
  end.set_seq(seq);
  end.set_compared_bytes(snap.size);
  end.set_mismatched_grains(found.mismatched_grains);
  end.set_grain(kDigestGrain);
  RETURN_IF_ERROR(link->Send(FrameType::kVerifyEnd, end.SerializeAsString(), {}));
  ASSIGN_OR_RETURN(Frame f, link->Receive(timeouts_.stall));
  if (f.type == FrameType::kLinkError) return StatusFromLinkError(f, "sink");
  pb::VerifyEnd recorded;
  if (f.type != FrameType::kVerifyEnd || !recorded.ParseFromString(f.body) ||
      recorded.seq() != seq || recorded.recorded_ns() == 0) {
    return DataLoss(fmt::format("the sink did not answer VerifyEnd with its record (got {})",
                                FrameTypeName(f.type)));
  }
  link->Close();
  if (found.mismatched_grains == 0) {
    spdlog::info("volume {}: restore point {} at site '{}' equals {}@{} ({} bytes compared)",
                 config_.id, seq, hello.site, config_.image, name, snap.size);
  } else {
    spdlog::error(
        "volume {}: restore point {} at site '{}' DIFFERS from {}@{} in {} grains of {} "
        "bytes (first at {})",
        config_.id, seq, hello.site, config_.image, name, found.mismatched_grains, kDigestGrain,
        found.mismatches.front().offset);
  }
  return OkStatus();
}

Status SourceReplicator::CompareAll(Link& link, AsyncIo& io, uint64_t seq, uint64_t size) {
  const auto window = [&](uint64_t off) { return std::min(kDigestWindow, size - off); };
  if (size > 0) RETURN_IF_ERROR(AskDigests(link, seq, 0, window(0), kDigestGrain, size));
  for (uint64_t off = 0; off < size; off += kDigestWindow) {
    {
      std::lock_guard lock(mu_);
      if (stop_) return Aborted("cairnd stops");
    }
    const uint64_t len = window(off);
    // The sink is asked a window ahead: it reads the next one while this
    // side reads the current one, and neither waits for the round trip.
    if (const uint64_t next = off + kDigestWindow; next < size) {
      RETURN_IF_ERROR(AskDigests(link, seq, next, window(next), kDigestGrain, size));
    }
    ASSIGN_OR_RETURN(const std::string ours, DigestRange(io, size, off, len, kDigestGrain, size));
    ASSIGN_OR_RETURN(const std::string theirs,
                     TakeDigests(link, off, len, kDigestGrain, timeouts_.stall));
    RETURN_IF_ERROR(CompareWindow(off, ours, theirs));
  }
  return OkStatus();
}

Status SourceReplicator::CompareWindow(uint64_t offset, std::string_view ours,
                                       std::string_view theirs) {
  constexpr size_t kDigest = GrainDigest::kSize;
  if (ours.size() != theirs.size() || ours.size() % kDigest != 0) {
    return DataLoss(fmt::format("the sink sent {} bytes of digests for the window at {}, not {}",
                                theirs.size(), offset, ours.size()));
  }
  std::lock_guard lock(mu_);
  VerifyStatusInfo& v = status_.verify;
  const uint64_t end = v.total_bytes;
  for (size_t i = 0; i < ours.size(); i += kDigest) {
    if (std::memcmp(ours.data() + i, theirs.data() + i, kDigest) == 0) continue;
    const uint64_t at = offset + (i / kDigest) * kDigestGrain;
    const uint64_t len = std::min<uint64_t>(kDigestGrain, end - at);
    ++v.mismatched_grains;
    if (!v.mismatches.empty() && v.mismatches.back().offset + v.mismatches.back().length == at) {
      v.mismatches.back().length += len;
    } else if (v.mismatches.size() < VerifyStatusInfo::kListed) {
      v.mismatches.push_back({at, len, RecordKind::kData});
    }
  }
  v.done_bytes = std::min(end, offset + kDigestWindow);
  return OkStatus();
}

}  // namespace cairn
