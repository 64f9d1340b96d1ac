#include "engine/daemon/control.h"

#include <fmt/format.h>
#include <grp.h>
#include <pwd.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "proto/cairn.pb.h"

namespace cairn {
namespace {

void FillStatus(const VolumeStatusInfo& s, pb::VolumeStatus* v) {
  v->set_volume(s.volume);
  v->set_role(s.role);
  v->set_state(std::string(StateName(s.state)));
  v->set_last_seq(s.last_seq);
  v->set_last_point_time_ns(s.last_point_time_ns);
  v->set_lag_seconds(s.lag_seconds);
  v->set_throughput_bps(s.throughput_bps);
  v->set_bytes_total(s.bytes_total);
  v->set_epochs_total(s.epochs_total);
  v->set_error(s.error);
  v->set_peer(s.peer);
  v->set_pool(s.pool);
  v->set_image(s.image);
  v->set_errors_total(s.errors_total);
  v->set_corrupt_frames_total(s.corrupt_frames_total);
  v->set_resumed_epochs_total(s.resumed_epochs_total);
  v->set_pending_snapshots(s.pending_snapshots);
  v->set_unchanged_checks_total(s.unchanged_checks_total);
  v->set_epoch_sent_bytes(s.epoch_sent_bytes);
  v->set_wire_bytes_total(s.wire_bytes_total);
  if (s.verify.id != 0) {
    auto* m = v->mutable_verify();
    m->set_id(s.verify.id);
    m->set_seq(s.verify.seq);
    m->set_running(s.verify.running);
    m->set_done_bytes(s.verify.done_bytes);
    m->set_total_bytes(s.verify.total_bytes);
    m->set_mismatched_grains(s.verify.mismatched_grains);
    m->set_grain(s.verify.grain);
    for (const Extent& e : s.verify.mismatches) {
      m->add_mismatch_offsets(e.offset);
      m->add_mismatch_lengths(e.length);
    }
    m->set_error(s.verify.error);
    m->set_seconds(s.verify.seconds);
    m->set_repair(s.verify.repair);
    m->set_repaired_seq(s.verify.repaired_seq);
  }
}

std::string Reply(const Status& st, pb::ControlReply& reply) {
  reply.set_code(static_cast<int>(st.code()));
  reply.set_message(st.message());
  return reply.SerializeAsString();
}

// One per operation of the control API: runs it on `service` and, on
// success, fills the operation's part of `reply`. The status returned
// becomes the reply's code and message.

Status AnswerStatus(ControlService& service, const pb::StatusRequest& q, pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const auto volumes, service.VolumeStatus(q.volume()));
  auto* m = reply.mutable_status();  // present even when no volume is
  for (const auto& s : volumes) FillStatus(s, m->add_volumes());
  return OkStatus();
}

Status AnswerPoints(ControlService& service, const pb::PointsRequest& q, pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const auto points, service.Points(q.volume()));
  auto* m = reply.mutable_points();
  for (const auto& p : points) RestorePointToProto(p, m->add_points());
  return OkStatus();
}

Status AnswerRestore(ControlService& service, const pb::RestoreRequest& q,
                     pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const RestoreResult r,
                   service.Restore(q.volume(), q.seq(), q.to_image(), q.full(), q.force()));
  auto* m = reply.mutable_restore();
  m->set_pool(r.pool);
  m->set_image(r.image);
  m->set_seq(r.point.epoch.seq);
  m->set_mode(r.mode);
  m->set_source_time_ns(r.point.epoch.snap_time_ns);
  return OkStatus();
}

Status AnswerVerify(ControlService& service, const pb::VerifyRequest& q, pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const ControlService::VerifyStarted v,
                   service.Verify(q.volume(), q.seq(), q.repair()));
  reply.mutable_verify()->set_id(v.id);
  reply.mutable_verify()->set_seq(v.seq);
  return OkStatus();
}

Status AnswerDrill(ControlService& service, const pb::DrillRequest& q, pb::ControlReply& reply) {
  auto* m = reply.mutable_drill();
  if (q.stop()) {
    ASSIGN_OR_RETURN(const auto removed, service.DrillStop(q.volume(), q.image()));
    for (const auto& image : removed) m->add_images(image);
    return OkStatus();
  }
  ASSIGN_OR_RETURN(const DrillResult r, service.DrillStart(q.volume(), q.seq(), q.image()));
  m->set_pool(r.pool);
  m->add_images(r.image);
  m->set_seq(r.point.epoch.seq);
  m->set_source_time_ns(r.point.epoch.snap_time_ns);
  return OkStatus();
}

Status AnswerReplicate(ControlService& service, const pb::ReplicateRequest& q,
                       pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const uint64_t seq, service.Replicate(q.volume()));
  reply.mutable_replicate()->set_seq(seq);
  return OkStatus();
}

StatusOr<Registration> RegistrationOf(const pb::RegisterRequest& q) {
  Registration r{q.volume(),       q.pool(),  q.image(),    q.target_pool(),
                 q.target_image(), q.group(), std::nullopt, {}};
  auto snapshot_tiers = ParseRetentionTiers(q.snapshot_retention());
  if (!snapshot_tiers.ok()) {
    return snapshot_tiers.status().Annotate("register " + q.volume() + ": snapshot_retention");
  }
  r.snapshot_tiers = std::move(snapshot_tiers).value();
  if (q.has_retention()) {
    auto tiers = ParseRetentionTiers(q.retention().tiers());
    if (!tiers.ok()) return tiers.status().Annotate("register " + q.volume() + ": retention");
    r.retention = RetentionRules{q.retention().keep_points(), std::move(tiers).value()};
  }
  return r;
}

Status AnswerRegister(ControlService& service, const pb::RegisterRequest& q,
                      pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const Registration r, RegistrationOf(q));
  ASSIGN_OR_RETURN(const VolumeStatusInfo s, service.Register(r));
  FillStatus(s, reply.mutable_register_volume()->mutable_status());
  return OkStatus();
}

Status AnswerRegisterMany(ControlService& service, const pb::RegisterVolumesRequest& q,
                          pb::ControlReply& reply) {
  std::vector<Registration> rs;
  for (const auto& v : q.volumes()) {
    ASSIGN_OR_RETURN(Registration r, RegistrationOf(v));
    rs.push_back(std::move(r));
  }
  ASSIGN_OR_RETURN(const std::vector<VolumeStatusInfo> statuses, service.RegisterMany(rs));
  auto* out = reply.mutable_register_volumes();
  for (const auto& s : statuses) FillStatus(s, out->add_status());
  return OkStatus();
}

Status AnswerUnregister(ControlService& service, const pb::UnregisterRequest& q,
                        pb::ControlReply& reply) {
  RETURN_IF_ERROR(service.Unregister(q.volume(), q.remove_snapshots()));
  reply.mutable_unregister_volume();
  return OkStatus();
}

Status AnswerPromote(ControlService& service, const pb::PromoteRequest& q,
                     pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const PromoteResult r,
                   service.Promote(q.volume(), q.seq(), q.pool(), q.to_image()));
  auto* m = reply.mutable_promote();
  RestorePointToProto(r.point, m->mutable_point());
  m->set_pool(r.pool);
  m->set_image(r.image);
  m->set_again(r.again);
  return OkStatus();
}

Status AnswerRelease(ControlService& service, const pb::ReleaseRequest& q,
                     pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const std::string kept_as, service.Release(q.volume()));
  reply.mutable_release()->set_kept_as(kept_as);
  return OkStatus();
}

Status AnswerResolve(ControlService& service, const pb::ResolveRequest& q,
                     pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const ControlService::Resolved r, service.Resolve(q.volume(), q.keep_site()));
  reply.mutable_resolve()->set_kept_as(r.kept_as);
  reply.mutable_resolve()->set_outcome(r.outcome);
  return OkStatus();
}

Status AnswerFailback(ControlService& service, const pb::FailbackRequest& q,
                      pb::ControlReply& reply) {
  ASSIGN_OR_RETURN(const ControlService::FailedBack r, service.Failback(q.volume(), q.seq()));
  auto* m = reply.mutable_failback();
  m->set_seq(r.seq);
  m->set_primary_site(r.primary_site);
  m->set_kept_as(r.kept_as);
  m->set_copied_bytes(r.copied_bytes);
  return OkStatus();
}

void FillGroupPoint(const GroupPoint& g, pb::GroupPoint* m) {
  m->set_group(g.group);
  m->set_seq(g.seq);
  m->set_source_time_ns(g.source_time_ns);
  for (const auto& v : g.volumes) m->add_volumes(v);
}

void FillGroupStatus(const GroupStatusInfo& g, pb::GroupStatus* m) {
  m->set_group(g.group);
  m->set_pool(g.pool);
  for (const auto& v : g.volumes) m->add_volumes(v);
  m->set_instant_seq(g.instant_seq);
  m->set_instant_time_ns(g.instant_time_ns);
  m->set_last_seq(g.last_seq);
  m->set_unchanged_at_ns(g.unchanged_at_ns);
  m->set_instants_total(g.instants_total);
  m->set_error(g.error);
  for (const auto& v : g.waiting_for) m->add_waiting_for(v);
}

Status AnswerGroup(ControlService& service, const pb::GroupRequest& q, pb::ControlReply& reply) {
  auto* m = reply.mutable_group();
  switch (q.action()) {
    case pb::GroupRequest::STATUS: {
      ASSIGN_OR_RETURN(const auto groups, service.GroupStatus(q.group()));
      for (const auto& g : groups) FillGroupStatus(g, m->add_status());
      return OkStatus();
    }
    case pb::GroupRequest::POINTS: {
      ASSIGN_OR_RETURN(const auto points, service.GroupPoints(q.group()));
      for (const auto& g : points) FillGroupPoint(g, m->add_points());
      return OkStatus();
    }
    case pb::GroupRequest::REPLICATE: {
      ASSIGN_OR_RETURN(const uint64_t seq, service.ReplicateGroup(q.group()));
      m->set_seq(seq);
      return OkStatus();
    }
    case pb::GroupRequest::RESTORE: {
      ASSIGN_OR_RETURN(const auto restored,
                       service.RestoreGroup(q.group(), q.seq(), q.suffix(), q.full(), q.force()));
      for (const auto& r : restored) {
        m->add_images(r.pool + "/" + r.image);
        m->set_seq(r.point.epoch.seq);
      }
      return OkStatus();
    }
    case pb::GroupRequest::DRILL_START:
    case pb::GroupRequest::DRILL_STOP: {
      ASSIGN_OR_RETURN(
          const auto drilled,
          service.DrillGroup(q.group(), q.seq(), q.action() == pb::GroupRequest::DRILL_STOP));
      m->set_seq(drilled.seq);
      for (const auto& image : drilled.images) m->add_images(image);
      return OkStatus();
    }
    case pb::GroupRequest::PROMOTE: {
      ASSIGN_OR_RETURN(const auto promoted, service.PromoteGroup(q.group(), q.seq(), q.suffix()));
      m->set_seq(promoted.seq);
      for (const auto& image : promoted.images) m->add_images(image);
      return OkStatus();
    }
    case pb::GroupRequest::REPLICATE_BACK: {
      std::vector<Registration> back;
      for (const auto& v : q.back().volumes()) {
        ASSIGN_OR_RETURN(Registration r, RegistrationOf(v));
        back.push_back(std::move(r));
      }
      ASSIGN_OR_RETURN(const auto statuses, service.ReplicateGroupBack(q.group(), back));
      for (const auto& s : statuses) FillStatus(s, m->add_back());
      return OkStatus();
    }
    case pb::GroupRequest::FAILBACK: {
      ASSIGN_OR_RETURN(const auto done, service.FailbackGroup(q.group(), q.seq()));
      m->set_seq(done.seq);
      m->set_primary_site(done.primary_site);
      for (const auto& image : done.images) m->add_images(image);
      return OkStatus();
    }
    default:
      return InvalidArgument(
          "group request names no action (status, points, replicate, restore, drill_start, "
          "drill_stop, promote, replicate_back, failback)");
  }
}

Status Answer(ControlService& service, const pb::ControlRequest& req, pb::ControlReply& reply) {
  switch (req.request_case()) {
    case pb::ControlRequest::kStatus:
      return AnswerStatus(service, req.status(), reply);
    case pb::ControlRequest::kPoints:
      return AnswerPoints(service, req.points(), reply);
    case pb::ControlRequest::kRestore:
      return AnswerRestore(service, req.restore(), reply);
    case pb::ControlRequest::kReplicate:
      return AnswerReplicate(service, req.replicate(), reply);
    case pb::ControlRequest::kRegisterVolume:
      return AnswerRegister(service, req.register_volume(), reply);
    case pb::ControlRequest::kRegisterVolumes:
      return AnswerRegisterMany(service, req.register_volumes(), reply);
    case pb::ControlRequest::kUnregisterVolume:
      return AnswerUnregister(service, req.unregister_volume(), reply);
    case pb::ControlRequest::kPromote:
      return AnswerPromote(service, req.promote(), reply);
    case pb::ControlRequest::kRelease:
      return AnswerRelease(service, req.release(), reply);
    case pb::ControlRequest::kResolve:
      return AnswerResolve(service, req.resolve(), reply);
    case pb::ControlRequest::kFailback:
      return AnswerFailback(service, req.failback(), reply);
    case pb::ControlRequest::kVerify:
      return AnswerVerify(service, req.verify(), reply);
    case pb::ControlRequest::kDrill:
      return AnswerDrill(service, req.drill(), reply);
    case pb::ControlRequest::kGroup:
      return AnswerGroup(service, req.group(), reply);
    case pb::ControlRequest::REQUEST_NOT_SET:
      break;
  }
  return InvalidArgument(
      "control request names no operation (status, points, restore, replicate, "
      "register_volume, register_volumes, unregister_volume, promote, release, resolve, failback, "
      "verify, drill, group)");
}

// What a changing request is called and the volume it names; nullopt for
// the read-only ones.
std::optional<std::pair<std::string_view, std::string>> Change(const pb::ControlRequest& req) {
  switch (req.request_case()) {
    case pb::ControlRequest::kRestore:
      return std::make_pair("restore", req.restore().volume());
    case pb::ControlRequest::kReplicate:
      return std::make_pair("replicate", req.replicate().volume());
    case pb::ControlRequest::kRegisterVolume:
      return std::make_pair("register_volume", req.register_volume().volume());
    case pb::ControlRequest::kRegisterVolumes:
      return std::make_pair("register_volumes", req.register_volumes().volumes().empty()
                                                    ? std::string()
                                                    : req.register_volumes().volumes(0).group());
    case pb::ControlRequest::kUnregisterVolume:
      return std::make_pair("unregister_volume", req.unregister_volume().volume());
    case pb::ControlRequest::kPromote:
      return std::make_pair("promote", req.promote().volume());
    case pb::ControlRequest::kRelease:
      return std::make_pair("release", req.release().volume());
    case pb::ControlRequest::kResolve:
      return std::make_pair("resolve", req.resolve().volume());
    case pb::ControlRequest::kFailback:
      return std::make_pair("failback", req.failback().volume());
    case pb::ControlRequest::kVerify:
      return std::make_pair("verify", req.verify().volume());
    case pb::ControlRequest::kDrill:
      return std::make_pair("drill", req.drill().volume());
    case pb::ControlRequest::kGroup:
      if (req.group().action() == pb::GroupRequest::STATUS ||
          req.group().action() == pb::GroupRequest::POINTS) {
        return std::nullopt;
      }
      return std::make_pair("group", req.group().group());
    default:
      return std::nullopt;
  }
}

// The name of user `uid` in the user database, or nullopt.
std::optional<std::string> UserName(uid_t uid) {
  std::vector<char> buf(16384);
  passwd pw{};
  passwd* found = nullptr;
  if (getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) {
    return std::nullopt;
  }
  return std::string(pw.pw_name);
}

// The groups of user `uid` in the user database (primary `gid` included).
std::vector<gid_t> GroupsOf(uid_t uid, gid_t gid) {
  const std::optional<std::string> name = UserName(uid);
  if (!name) return {gid};
  int n = 64;
  std::vector<gid_t> groups(n);
  if (getgrouplist(name->c_str(), gid, groups.data(), &n) < 0) {
    groups.resize(n);
    if (getgrouplist(name->c_str(), gid, groups.data(), &n) < 0) return {gid};
  }
  groups.resize(n);
  return groups;
}

}  // namespace

ControlCaller CallerOf(const PeerCredentials& c, std::optional<uint32_t> admin_gid) {
  ControlCaller caller;
  caller.who = fmt::format("pid {} uid {} ({})", c.pid, c.uid, UserName(c.uid).value_or("?"));
  if (c.uid == 0 || c.uid == ::geteuid()) {
    caller.admin = true;
  } else if (admin_gid) {
    const auto groups = GroupsOf(c.uid, c.gid);
    caller.admin = std::find(groups.begin(), groups.end(), *admin_gid) != groups.end();
  }
  return caller;
}

std::string HandleControl(ControlService& service, const Frame& request,
                          const ControlCaller& caller) {
  pb::ControlReply reply;
  pb::ControlRequest req;
  if (request.type != FrameType::kControlRequest || !req.ParseFromString(request.body)) {
    return Reply(InvalidArgument(fmt::format("malformed control request ({} frame of {} bytes)",
                                             FrameTypeName(request.type), request.body.size())),
                 reply);
  }
  if (const auto change = Change(req)) {
    if (!caller.admin) {
      spdlog::warn("control: refused {} of '{}' by {}: not in [cairnd] admin_group", change->first,
                   change->second, caller.who);
      return Reply(PermissionDenied(fmt::format(
                       "{} changes replication: the caller ({}) must be root, cairnd's own user "
                       "or a member of [cairnd] admin_group",
                       change->first, caller.who)),
                   reply);
    }
    spdlog::info("control: {} of '{}' by {}", change->first, change->second, caller.who);
  }
  return Reply(Answer(service, req, reply), reply);
}

}  // namespace cairn
