// Sink: receiving one epoch into the spool and, as it arrives, into the
// standby image's head (ReceiveEpoch; sink.h says what the sink is).

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <future>
#include <optional>
#include <system_error>

#include "engine/epoch/block_digests.h"
#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {

// One epoch being received: its verifier, its spool file and the writes to
// the standby head that overlap the receive. Every failure goes through
// Fail, which keeps the verified, durable prefix for a resume (or removes
// the spool) and says why.
class Sink::Reception {
 public:
  Reception(Sink& sink, Target& t) : sink_(sink), t_(t), verifier_(t.volume, t.last_seq, t.chain) {
    t_.streamed.reset();
  }

  // EpochBegin: the spool (new, or resumed after the durable prefix) and
  // the apply beside the receive.
  Status Begin(const Frame& begin);
  // Record frames up to EpochEnd, each verified before it is spooled.
  Status ReceiveRecords(Link& link);
  // The spool synced and the last writes to the standby drained: the
  // epoch is durable. Hands the streamed apply to t.streamed.
  StatusOr<EpochSummary> Finish();

  // Ends the epoch with `cause`, keeping what can be resumed.
  Status Fail(const Status& cause);
  // A failure of the spool itself (disk full, quota, I/O): the sink's fault.
  Status FailSpool(const Status& cause) {
    t_.sink_fault = true;
    return Fail(cause);
  }

 private:
  // The spool of a resumed epoch: the verifier replays the durable prefix,
  // then the stream continues exactly where it ends.
  Status ResumeSpool(const EpochSummary& announced);
  // Starts writing the epoch to the standby head as it arrives. If the
  // image cannot take it now, the epoch is still spooled and ApplyAndCommit
  // replays it (and reports why).
  // Takes memory_ along.
  void StartStreaming(const EpochSummary& announced, const ApplyOptions& opt);
  // The base point's snapshot, while the source asks for its digests.
  struct DigestBase {
    std::unique_ptr<Volume> vol;
    std::unique_ptr<AsyncIo> io;
    SnapInfo snap;
    uint64_t served_bytes = 0;
  };
  StatusOr<DigestBase> OpenDigestBase(uint64_t base_seq);
  // A resync by digests (block_digests.h): the digests of the epoch's
  // base point asked for by `request`, read from the point's snapshot.
  Status AnswerDigests(Link& link, const Frame& request);
  // After the epoch's last frame: the base point's snapshot that answered
  // digests is still there, with the id it had (else what it read may
  // have been zeros, and the source left out grains on their word).
  Status ConfirmDigestBase();
  // What a spool refusal tells the operator to do.
  Status AdviseSpoolRefusal(const Status& st, uint64_t kept, uint64_t seq) const;
  // Adds the time since the previous lap to `stage`.
  void Lap(double& stage) {
    const auto now = sink_.env_.clock->Now();
    stage += std::chrono::duration<double>(now - lap_).count();
    lap_ = now;
  }

  Sink& sink_;
  Target& t_;
  EpochVerifier verifier_;
  std::unique_ptr<SpoolWriter> spool_;
  std::optional<uint64_t> spool_seq_;  // the epoch whose spool this reception writes
  uint64_t spooled_records_ = 0;       // whole Record frames in the spool
  bool at_end_ = false;                // the failure is the epoch's end
  // The epoch's spool buffers and apply window, until the streamed apply
  // takes it along.
  MemoryBudget::Lease memory_;
  std::unique_ptr<Target::Streamed> streamed_;
  Target::ReceiveTimes times_;
  std::optional<DigestBase> digest_base_;
  Clock::TimePoint begun_;
  Clock::TimePoint lap_;
};

Status Sink::Reception::AdviseSpoolRefusal(const Status& st, uint64_t kept, uint64_t seq) const {
  std::string advice;
  if (st.reason() == Reason::kSpoolDiskFull) {
    advice = fmt::format("free space in {} or move [sink] spool_dir", sink_.env_.spools->where());
  } else if (st.reason() == Reason::kSpoolQuota) {
    advice = "raise [sink] spool_max_bytes and restart cairnd";
  }
  if (advice.empty()) return st;
  const std::string what =
      kept > 0
          ? fmt::format("{} verified records of epoch {} are kept, the source resumes after them",
                        kept, seq)
          : fmt::format("nothing of epoch {} is kept", seq);
  return ResourceExhausted(fmt::format("{}; {}; {}", st.message(), advice, what))
      .WithReason(st.reason());
}

Status Sink::Reception::Fail(const Status& cause) {
  streamed_.reset();  // its writes end first; the head stays between two points
  Status st = cause;
  const uint64_t seq = verifier_.begin().id.seq;
  // Keep what was verified and spooled, durably: the source re-sends only
  // the rest. If it cannot be made durable it is worth nothing, and an
  // epoch whose end does not verify as a whole starts over (resuming it
  // would fail the same way every time), as does a resumed epoch whose
  // records do not verify after the prefix (its source planned it anew,
  // and otherwise: a resend beats resuming a prefix of another plan over
  // and over). Nor is anything kept of an epoch its source abandoned: what
  // it read may not be its snapshot's.
  uint64_t kept = 0;
  const bool bad = st.code() == Code::kDataLoss && (at_end_ || t_.resumed);
  if (spool_ && !t_.source_fault && !bad) {
    if (spool_->Sync().ok()) {
      kept = spooled_records_;
    } else if (spool_->SyncWritten().ok()) {
      // A write failed (a full disk): what reached the file is durable
      // now; read it back to learn how much of it is whole and verifies.
      spool_.reset();
      kept = sink_.VerifiedRecords(t_, seq);
    }
  }
  if (st.code() == Code::kResourceExhausted) {
    t_.sink_fault = true;
    t_.spool_refused = st.reason();
    st = AdviseSpoolRefusal(st, kept, seq);
  }
  if (st.code() == Code::kAborted) {
    // The source went away mid-epoch (stopped, restarted, its link cut).
    spdlog::warn("volume {}: epoch {} cut short: {}", t_.volume, seq, st.message());
  } else {
    spdlog::error("volume {}: epoch refused: {}", t_.volume, st.message());
  }
  if (kept > 0) {
    spdlog::info("volume {}: kept {} verified records of epoch {} for resume", t_.volume, kept,
                 seq);
  } else if (spool_seq_) {
    spool_.reset();
    (void)sink_.env_.spools->Remove(t_.volume, *spool_seq_);
  }
  return st;
}

Status Sink::Reception::ResumeSpool(const EpochSummary& announced) {
  if (t_.partial.seq != announced.id.seq || t_.partial.records != announced.resume_from) {
    return Fail(DataLoss(fmt::format(
        "source resumes epoch {} at record {}, but this sink holds {} records of epoch {}",
        announced.id.seq, announced.resume_from, t_.partial.records, t_.partial.seq)));
  }
  if (Status st = sink_.ReplayPrefix(t_, verifier_); !st.ok()) return Fail(st);
  const EpochSummary& had = verifier_.begin();
  if (had.id.base_seq != announced.id.base_seq || had.id.image_size != announced.id.image_size ||
      had.id.snap_time_ns != announced.id.snap_time_ns || had.max_block != announced.max_block) {
    return Fail(
        DataLoss(fmt::format("resumed epoch {} differs from the spooled one", announced.id.seq)));
  }
  auto w =
      sink_.env_.spools->Resume(t_.volume, announced.id.seq, t_.partial.offset, sink_.env_.spool);
  if (!w.ok()) return FailSpool(w.status());
  spool_ = std::move(w).value();
  spooled_records_ = t_.partial.records;
  return OkStatus();
}

void Sink::Reception::StartStreaming(const EpochSummary& announced, const ApplyOptions& opt) {
  auto prepared = sink_.PrepareTarget(t_);
  if (!prepared.ok()) return;
  streamed_ = std::make_unique<Target::Streamed>();
  streamed_->seq = announced.id.seq;
  streamed_->vol = std::move(prepared->vol);
  streamed_->memory = std::move(memory_);
  streamed_->apply = std::make_unique<ApplyStream>(*streamed_->vol, opt, prepared->state);
  if (Status st = streamed_->apply->Begin(announced.id.image_size); !st.ok()) {
    WarnAppliedFromSpool(t_.volume, announced.id.seq, st);
    streamed_.reset();
  }
}

Status Sink::Reception::Begin(const Frame& begin) {
  auto step = verifier_.Check(begin);
  if (!step.ok()) return Fail(step.status());
  if (*step != EpochVerifier::Step::kBegin) {
    return Fail(DataLoss("epoch does not start with EpochBegin"));
  }
  const EpochSummary announced = verifier_.begin();
  spool_seq_ = announced.id.seq;
  // The epoch's memory (spool buffers, apply window) before anything is
  // made of it: a session that waits for its share holds nothing meanwhile
  // (a thousand of them, each with its spool's buffers, were most of a
  // sink's peak RSS).
  ApplyOptions opt;
  auto memory = sink_.BorrowApplyMemory(announced.max_block, announced.id.image_size, &opt);
  if (!memory.ok()) return Fail(memory.status());
  memory_ = std::move(memory).value();
  t_.resumed = announced.resume_from > 0;
  if (t_.resumed) {
    RETURN_IF_ERROR(ResumeSpool(announced));
  } else {
    auto w = sink_.env_.spools->Create(t_.volume, announced.id.seq, sink_.env_.spool);
    if (!w.ok()) return FailSpool(w.status());
    spool_ = std::move(w).value();
    const auto header = EncodeHeader(begin.type, begin.body, 0);
    if (Status st = spool_->Append(header, begin.body, {}); !st.ok()) return FailSpool(st);
  }
  t_.partial = {};
  if (!t_.resumed) StartStreaming(announced, opt);
  sink_.SetState(t_.volume, [&](VolumeStatusInfo& s) { s.state = VolumeState::kReceiving; });
  begun_ = lap_ = sink_.env_.clock->Now();
  return OkStatus();
}

Status Sink::Reception::ReceiveRecords(Link& link) {
  const uint64_t seq = verifier_.begin().id.seq;
  while (true) {
    auto next = link.Receive(sink_.env_.timeouts.stall);
    Lap(times_.link);
    if (!next.ok()) return Fail(next.status());
    const Frame& f = *next;
    if (f.type == FrameType::kLinkError) {
      // In place of the epoch's end: the source could not read all of it
      // (its snapshot or image vanished, a read failed). Nothing of it may
      // become a point.
      t_.source_fault = true;
      const Status why = StatusFromLinkError(f, "source");
      const bool plain = why.code() != Code::kDataLoss && why.code() != Code::kAborted;
      return Fail(Status(plain ? why.code() : Code::kFailedPrecondition,
                         fmt::format("epoch {} abandoned by its {}; no restore point is made of it",
                                     seq, why.message())));
    }
    if (f.type == FrameType::kDigestRequest) {
      Status st = AnswerDigests(link, f);
      Lap(times_.verify);
      if (!st.ok()) return Fail(st);
      continue;
    }
    at_end_ = f.type == FrameType::kEpochEnd;
    if (at_end_ && t_.resync_base && verifier_.begin().id.base_seq == 0 &&
        (!digest_base_ || digest_base_->served_bytes < verifier_.begin().id.image_size)) {
      return Fail(DataLoss(fmt::format(
          "epoch {} is a first epoch onto {}/{}, which holds the data it was adopted with, but "
          "was not compared with all of it by digests: it would leave blocks the source does "
          "not have",
          seq, t_.pool_name, t_.image)));
    }
    if (at_end_ && digest_base_) {
      if (Status st = ConfirmDigestBase(); !st.ok()) return Fail(st);
    }
    auto step = verifier_.Check(f);
    Lap(times_.verify);
    if (!step.ok()) return Fail(step.status());
    if (*step == EpochVerifier::Step::kBegin) return Fail(DataLoss("EpochBegin inside an epoch"));
    const auto header = EncodeHeader(f.type, f.body, static_cast<uint32_t>(f.payload.size()));
    Status appended = spool_->Append(header, f.body, f.payload);
    Lap(times_.spool);
    if (!appended.ok()) return FailSpool(appended);
    if (*step == EpochVerifier::Step::kEnd) return OkStatus();
    ++spooled_records_;
    if (streamed_) {
      Status st = streamed_->apply->Add(verifier_.record(), std::move(next).value());
      Lap(times_.standby);
      if (!st.ok()) {
        WarnAppliedFromSpool(t_.volume, seq, st);
        streamed_.reset();
      }
    }
  }
}

Status Sink::Reception::AnswerDigests(Link& link, const Frame& request) {
  const EpochSummary& epoch = verifier_.begin();
  pb::DigestRequest rq;
  if (!rq.ParseFromString(request.body)) return DataLoss("a DigestRequest that does not parse");
  if (rq.base_seq() != epoch.id.base_seq || rq.image_size() != epoch.id.image_size ||
      (rq.base_seq() == 0 && !t_.resync_base)) {
    return DataLoss(fmt::format(
        "a DigestRequest for point {} of an image of {} bytes inside epoch {} (base {}, {} bytes)",
        rq.base_seq(), rq.image_size(), epoch.id.seq, epoch.id.base_seq, epoch.id.image_size));
  }
  if (!digest_base_) {
    ASSIGN_OR_RETURN(digest_base_, OpenDigestBase(rq.base_seq()));
  }
  // In order and without gaps: at the epoch's end, served_bytes up to the
  // image size means every grain was compared.
  if (rq.offset() != digest_base_->served_bytes) {
    return DataLoss(fmt::format("a DigestRequest at {} after digests up to {} in epoch {}",
                                rq.offset(), digest_base_->served_bytes, epoch.id.seq));
  }
  ASSIGN_OR_RETURN(std::string digests,
                   DigestRange(*digest_base_->io, digest_base_->snap.size, rq.offset(), rq.length(),
                               rq.grain(), rq.image_size()));
  digest_base_->served_bytes += rq.length();
  pb::DigestReply reply;
  reply.set_offset(rq.offset());
  reply.set_grain(rq.grain());
  reply.set_digests(std::move(digests));
  return link.Send(FrameType::kDigestReply, reply.SerializeAsString(), {});
}

StatusOr<Sink::Reception::DigestBase> Sink::Reception::OpenDigestBase(uint64_t base_seq) {
  // What PrepareTarget puts the head back to before the epoch's writes:
  // the point's snapshot on t's image; with no point, the image as
  // adopted.
  const std::string& image = t_.image;
  const std::string snap = SnapName(base_seq);
  if (base_seq > 0) {
    ASSIGN_OR_RETURN(const auto latest, t_.catalog->Latest(t_.volume));
    if (!latest || latest->epoch.seq != base_seq || latest->pool != t_.pool_name ||
        latest->image != t_.image || latest->snap != snap) {
      return FailedPrecondition(fmt::format(
          "restore point {} of volume '{}' is not the newest here as {}/{}@{}: no digests of it",
          base_seq, t_.volume, t_.pool_name, t_.image, snap));
    }
  }
  DigestBase b;
  ASSIGN_OR_RETURN(b.vol, t_.pool->Open(image));
  ASSIGN_OR_RETURN(const auto snaps, b.vol->ListSnaps());
  std::optional<SnapInfo> found;
  if (base_seq == 0) {
    found = ResyncBaseOf(snaps);
  } else {
    auto it =
        std::find_if(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == snap; });
    if (it != snaps.end()) found = *it;
  }
  if (!found) {
    return FailedPrecondition(
        fmt::format("{}/{} has no snapshot {} to take digests of for volume "
                    "'{}'",
                    t_.pool_name, image, base_seq ? snap : "cairn-divergent-<time>", t_.volume));
  }
  b.snap = *found;
  ASSIGN_OR_RETURN(b.io, b.vol->OpenIo(b.snap.name));
  return b;
}

Status Sink::Reception::ConfirmDigestBase() {
  DigestBase& b = *digest_base_;
  b.io.reset();
  // What the source sent on their word is worth nothing then: the epoch
  // starts over (kDataLoss at its end keeps no prefix).
  if (Status gone = b.vol->ConfirmSnap(b.snap.name, b.snap.id); !gone.ok()) {
    return DataLoss(
        fmt::format("the digests of restore point {} were read from a snapshot that "
                    "is no longer there: {}",
                    verifier_.begin().id.base_seq, gone.message()));
  }
  spdlog::info("volume {}: epoch {} compared by digests with {}@{}: {} bytes", t_.volume,
               verifier_.begin().id.seq, b.vol->name(), b.snap.name, b.served_bytes);
  digest_base_.reset();
  return OkStatus();
}

StatusOr<EpochSummary> Sink::Reception::Finish() {
  at_end_ = true;
  Clock& clock = *sink_.env_.clock;
  const auto t_end = clock.Now();
  // The last writes to the standby image drain while the spool syncs.
  std::future<Status> drained;
  if (streamed_) {
    drained = std::async(std::launch::async,
                         [apply = streamed_->apply.get()] { return apply->Finish(); });
  }
  auto synced = spool_->Sync();
  if (drained.valid()) {
    if (Status st = drained.get(); !st.ok()) {
      WarnAppliedFromSpool(t_.volume, verifier_.begin().id.seq, st);
      streamed_.reset();
    }
  }
  if (!synced.ok()) return FailSpool(synced.status());
  times_.tail = clock.SecondsSince(t_end);
  times_.total = clock.SecondsSince(begun_);
  t_.times = times_;
  if (streamed_) {
    streamed_->summary = verifier_.summary();
    t_.streamed = std::move(streamed_);
  }
  return verifier_.summary();
}

StatusOr<EpochSummary> Sink::ReceiveEpoch(Link& link, Target& t, Frame begin) {
  Reception r(*this, t);
  RETURN_IF_ERROR(r.Begin(begin));
  RETURN_IF_ERROR(r.ReceiveRecords(link));
  return r.Finish();
}

}  // namespace cairn
