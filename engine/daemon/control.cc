#include "engine/daemon/control.h"

#include <fmt/format.h>

#include "proto/cairn.pb.h"

namespace cairn {
namespace {

void FillPoint(const RestorePoint& p, pb::RestorePoint* m) {
  m->set_volume(p.volume);
  m->set_seq(p.seq);
  m->set_base_seq(p.base_seq);
  m->set_source_time_ns(p.source_time_ns);
  m->set_created_time_ns(p.created_time_ns);
  m->set_pool(p.pool);
  m->set_image(p.image);
  m->set_snap(p.snap);
  m->set_image_size(p.image_size);
  m->set_data_bytes(p.data_bytes);
  m->set_zero_bytes(p.zero_bytes);
  m->set_epoch_digest(p.epoch_digest.AsBytes());
  m->set_chain_digest(p.chain_digest.AsBytes());
  m->set_state(pb::RestorePoint::COMPLETE);
  m->set_source_site(p.source_site);
}

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
}

std::string Reply(const Status& st, pb::ControlReply& reply) {
  reply.set_code(static_cast<int>(st.code()));
  reply.set_message(st.message());
  return reply.SerializeAsString();
}

}  // namespace

std::string HandleControl(ControlService& service, const Frame& request) {
  pb::ControlReply reply;
  pb::ControlRequest req;
  if (request.type != FrameType::kControlRequest || !req.ParseFromString(request.body)) {
    return Reply(InvalidArgument(fmt::format("malformed control request ({} frame of {} bytes)",
                                             FrameTypeName(request.type), request.body.size())),
                 reply);
  }
  switch (req.request_case()) {
    case pb::ControlRequest::kStatus: {
      auto r = service.VolumeStatus(req.status().volume());
      if (!r.ok()) return Reply(r.status(), reply);
      for (const auto& s : *r) {
        FillStatus(s, reply.mutable_status()->add_volumes());
      }
      reply.mutable_status();
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::kPoints: {
      auto r = service.Points(req.points().volume());
      if (!r.ok()) return Reply(r.status(), reply);
      auto* points = reply.mutable_points();
      for (const auto& p : *r) FillPoint(p, points->add_points());
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::kRestore: {
      const auto& q = req.restore();
      auto r = service.Restore(q.volume(), q.seq(), q.to_image(), q.full());
      if (!r.ok()) return Reply(r.status(), reply);
      auto* m = reply.mutable_restore();
      m->set_pool(r->pool);
      m->set_image(r->image);
      m->set_seq(r->point.seq);
      m->set_mode(r->mode);
      m->set_source_time_ns(r->point.source_time_ns);
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::kReplicate: {
      auto r = service.Replicate(req.replicate().volume());
      if (!r.ok()) return Reply(r.status(), reply);
      reply.mutable_replicate()->set_seq(*r);
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::kRegisterVolume: {
      const auto& q = req.register_volume();
      auto r =
          service.Register({q.volume(), q.pool(), q.image(), q.target_pool(), q.target_image()});
      if (!r.ok()) return Reply(r.status(), reply);
      FillStatus(*r, reply.mutable_register_volume()->mutable_status());
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::kUnregisterVolume: {
      const auto& q = req.unregister_volume();
      Status st = service.Unregister(q.volume(), q.remove_snapshots());
      if (st.ok()) reply.mutable_unregister_volume();
      return Reply(st, reply);
    }
    case pb::ControlRequest::kPromote: {
      const auto& q = req.promote();
      auto r = service.Promote(q.volume(), q.seq(), q.pool(), q.to_image());
      if (!r.ok()) return Reply(r.status(), reply);
      auto* m = reply.mutable_promote();
      FillPoint(r->point, m->mutable_point());
      m->set_pool(r->pool);
      m->set_image(r->image);
      m->set_again(r->again);
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::kRelease: {
      auto r = service.Release(req.release().volume());
      if (!r.ok()) return Reply(r.status(), reply);
      reply.mutable_release()->set_kept_as(*r);
      return Reply(OkStatus(), reply);
    }
    case pb::ControlRequest::REQUEST_NOT_SET:
      break;
  }
  return Reply(InvalidArgument("control request names no operation (status, points, restore, "
                               "replicate, register_volume, unregister_volume, promote, release)"),
               reply);
}

}  // namespace cairn
