#include "engine/daemon/daemon.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <grp.h>
#include <spdlog/spdlog.h>

#include <filesystem>

#include "engine/ceph/rados_kv_store.h"
#include "engine/daemon/metrics.h"
#include "engine/daemon/registry.h"
#include "engine/spool/file_spool_store.h"

namespace cairn {

namespace {

// The id of group `name` ("" : none). kFailedPrecondition naming `key` if
// the host has no such group.
StatusOr<std::optional<uint32_t>> GroupId(const std::string& name, std::string_view key) {
  if (name.empty()) return std::optional<uint32_t>();
  std::vector<char> buf(16384);
  group g{};
  group* found = nullptr;
  if (getgrnam_r(name.c_str(), &g, buf.data(), buf.size(), &found) != 0 || found == nullptr) {
    return FailedPrecondition(fmt::format(
        "[cairnd] {} '{}' is not a group on this host (getent group {})", key, name, name));
  }
  return std::optional<uint32_t>(g.gr_gid);
}

}  // namespace

StatusOr<std::unique_ptr<Daemon>> Daemon::Create(DaemonConfig config) {
  std::unique_ptr<Daemon> d(new Daemon(std::move(config)));
  ASSIGN_OR_RETURN(d->control_gid_, GroupId(d->config_.control_group, "control_group"));
  ASSIGN_OR_RETURN(d->admin_gid_, GroupId(d->config_.admin_group, "admin_group"));
  const CephConfig& ceph = d->config_.ceph;
  auto cluster = RbdCluster::Connect(ceph.conf, ceph.client, ceph.keyring, ceph.op_timeout);
  if (!cluster.ok()) return cluster.status().Annotate("connecting to the local Ceph cluster");
  d->cluster_ = *cluster;
  d->budget_ = std::make_shared<MemoryBudget>(d->config_.memory_budget);
  if (d->config_.max_send_rate > 0) {
    d->pacer_ = std::make_shared<Pacer>(d->config_.max_send_rate);
  }
  if (d->config_.tls.insecure) {
    spdlog::error(
        "[tls] insecure = true: links between sites are plaintext; anyone who reaches them can "
        "read every block and forge restore points");
  } else {
    auto tls = TlsContext::Load(d->config_.tls.files);
    if (!tls.ok()) return tls.status();
    d->tls_ = *tls;
    spdlog::info("links are mutual TLS; this node's certificate names {}",
                 fmt::join(d->tls_->own_names(), ", "));
  }
  if (d->config_.sink) {
    for (const auto& pool : d->config_.sink->pools) {
      auto p = d->OpenPool(pool);
      if (!p.ok()) return p.status().Annotate("[sink] pools");
    }
  }
  for (const auto& v : d->config_.volumes) {
    auto p = d->OpenPool(v.pool);
    if (!p.ok()) return p.status().Annotate(fmt::format("[volume {}] pool", v.id));
    auto exists = (*p)->Exists(v.image);
    if (!exists.ok()) return exists.status().Annotate(fmt::format("[volume {}]", v.id));
    if (!*exists) {
      spdlog::warn("volume {}: image {}/{} does not exist (yet); replication starts when it does",
                   v.id, v.pool, v.image);
    }
  }
  return d;
}

Daemon::~Daemon() { Stop(); }

StatusOr<std::shared_ptr<Pool>> Daemon::OpenPool(const std::string& name) {
  std::lock_guard lock(mu_);
  if (auto it = pools_.find(name); it != pools_.end()) return it->second;
  ASSIGN_OR_RETURN(auto pool, cluster_->OpenPool(name));
  pools_[name] = pool;
  return std::shared_ptr<Pool>(pool);
}

StatusOr<std::shared_ptr<KvStore>> Daemon::OpenCatalog(const std::string& pool) {
  std::lock_guard lock(mu_);
  if (auto it = catalogs_.find(pool); it != catalogs_.end()) return it->second;
  ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(pool, kCatalogObject));
  catalogs_[pool] = kv;
  return std::shared_ptr<KvStore>(kv);
}

Status Daemon::Start() {
  if (config_.sink) {
    const SinkConfig& sc = *config_.sink;
    std::error_code ec;
    std::filesystem::create_directories(sc.spool_dir, ec);
    if (ec) {
      return FailedPrecondition(
          fmt::format("[sink] spool_dir {} cannot be created: {}", sc.spool_dir, ec.message()));
    }
    // Port first: a second cairnd started by mistake with this config on
    // this host stops here, before it fences the one that runs.
    LinkOptions lo;
    lo.tls = tls_;
    auto listener = Listener::ListenTcp(sc.listen_host, sc.listen_port, lo);
    if (!listener.ok()) return listener.status().Annotate("[sink] listen");
    // Before any source is served and any spool recovered, the previous
    // instance must be unable to touch the standby images.
    RETURN_IF_ERROR(FencePreviousSink().Annotate("[sink] fencing the previous sink instance"));
    fence_watch_ = std::thread([this] { WatchFencing(); });
    SinkEnv env;
    env.site = config_.site;
    env.spools = std::make_shared<FileSpoolStore>(sc.spool_dir);
    env.pools = sc.pools;
    env.cluster = config_.ceph.conf;
    env.spool.max_bytes = sc.spool_max_bytes;
    env.keep_points = sc.keep_points;
    env.retention_tiers = sc.retention_tiers;
    env.apply.window = sc.window;
    env.apply.window_bytes = sc.window_bytes;
    env.budget = budget_;
    env.open_pool = [this](const std::string& p) { return OpenPool(p); };
    env.open_catalog = [this](const std::string& p) { return OpenCatalog(p); };
    env.gate = gate_;
    if (tls_) env.grants = config_.peers;
    sink_ = std::make_unique<Sink>(env);
    sink_server_ =
        std::make_unique<LinkServer>("sink", std::move(listener).value(), [this](Link& l) {
          Status st = sink_->Serve(l);
          if (!st.ok()) spdlog::warn("sink: session with {} ended: {}", l.peer(), st.ToString());
        });
    sink_server_->Start();
    spdlog::info("sink listening on {}:{}, spool {}", sc.listen_host, sink_server_->port(),
                 sc.spool_dir);
  }

  RETURN_IF_ERROR(StartVolumes());
  RETURN_IF_ERROR(StartRegistered());
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(config_.control_socket).parent_path(),
                                      ec);
  auto control =
      Listener::ListenUnix(config_.control_socket, {}, control_gid_ ? 0660 : 0600, control_gid_);
  if (!control.ok()) return control.status().Annotate("[cairnd] control_socket");
  control_server_ =
      std::make_unique<LinkServer>("control", std::move(control).value(), [this](Link& l) {
        const auto creds = l.credentials();
        const ControlCaller caller =
            creds ? CallerOf(*creds, admin_gid_) : ControlCaller{false, "an unknown process"};
        spdlog::debug("control: connection from {}{}", caller.who,
                      caller.admin ? " (admin)" : " (read only)");
        while (true) {
          auto f = l.Receive(std::chrono::minutes(10));
          if (!f.ok()) return;
          const std::string reply = HandleControl(*this, *f, caller);
          if (!l.Send(FrameType::kControlReply, reply, {}).ok()) return;
        }
      });
  control_server_->Start();
  if (config_.metrics_port != 0) {
    ASSIGN_OR_RETURN(metrics_, MetricsServer::Start(config_.metrics_host, config_.metrics_port,
                                                    [this] { return Metrics(); }));
    spdlog::info("metrics on http://{}:{}/metrics", config_.metrics_host, metrics_->port());
  }

  spdlog::info("cairnd (site {}) ready; control socket {}", config_.site, config_.control_socket);
  return OkStatus();
}

std::string Daemon::Metrics() {
  MetricsInput in;
  in.site = config_.site;
  in.now_ns = RealClock().UnixNs();
  if (auto all = VolumeStatus(""); all.ok()) in.volumes = std::move(all).value();
  if (auto groups = GroupStatus(""); groups.ok()) in.groups = std::move(groups).value();
  if (config_.sink) {
    // The spool's files: <spool_dir>/<volume>/<seq>.spool.
    std::error_code ec;
    for (const auto& dir : std::filesystem::directory_iterator(config_.sink->spool_dir, ec)) {
      if (!dir.is_directory(ec)) continue;
      uint64_t bytes = 0;
      for (const auto& f : std::filesystem::directory_iterator(dir.path(), ec)) {
        if (f.is_regular_file(ec)) bytes += f.file_size(ec);
      }
      in.spool_bytes[dir.path().filename().string()] = bytes;
    }
  }
  return RenderMetrics(in);
}

void Daemon::Stop() {
  // The control and metrics servers go first: they walk sources_ and sink_.
  metrics_.reset();
  if (control_server_) control_server_->Stop();
  control_server_.reset();
  if (fence_watch_.joinable()) {
    {
      std::lock_guard lock(fence_mu_);
      fence_stop_ = true;
    }
    fence_cv_.notify_all();
    fence_watch_.join();
  }
  std::vector<std::shared_ptr<SourceReplicator>> sources;
  std::vector<std::shared_ptr<GroupSource>> groups;
  {
    std::lock_guard lock(sources_mu_);
    sources.swap(sources_);
    groups.swap(groups_);
  }
  for (auto& g : groups) g->Stop();  // no instant is taken from now on
  // All at once: each ends what it is doing (a read window, a snapshot)
  // while the others do the same.
  for (auto& s : sources) s->RequestStop();
  for (auto& s : sources) s->Stop();
  if (sink_server_) sink_server_->Stop();
  sink_server_.reset();
  sink_.reset();  // its retry thread ends: nothing writes the standby images now
  ReleaseSinkLocks();
}

std::shared_ptr<SourceReplicator> Daemon::FindSource(const std::string& volume) {
  std::lock_guard lock(sources_mu_);
  for (const auto& s : sources_) {
    if (s->config().id == volume) return s;
  }
  return nullptr;
}

StatusOr<std::vector<VolumeStatusInfo>> Daemon::VolumeStatus(const std::string& volume) {
  std::vector<VolumeStatusInfo> out;
  std::vector<std::shared_ptr<SourceReplicator>> sources;
  {
    std::lock_guard lock(sources_mu_);
    sources = sources_;
  }
  for (const auto& s : sources) {
    if (volume.empty() || s->config().id == volume) out.push_back(s->Report());
  }
  if (sink_) {
    for (auto& s : sink_->Report()) {
      if (volume.empty() || s.volume == volume) out.push_back(std::move(s));
    }
  }
  if (!volume.empty() && out.empty()) {
    return NotFound(fmt::format("volume '{}' is not known to this cairnd", volume));
  }
  return out;
}

StatusOr<std::vector<RestorePoint>> Daemon::Points(const std::string& volume) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: ask the cairnd of the standby site");
  }
  return sink_->Points(volume);
}

StatusOr<RestoreResult> Daemon::Restore(const std::string& volume, uint64_t seq,
                                        const std::string& to_image, bool full, bool force) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: restore on the standby site's cairnd");
  }
  return sink_->Restore(volume, seq, to_image, full, nullptr, force);
}

StatusOr<DrillResult> Daemon::DrillStart(const std::string& volume, uint64_t seq,
                                         const std::string& image) {
  if (!sink_) return FailedPrecondition("this cairnd is not a sink: drill on the standby's cairnd");
  return sink_->DrillStart(volume, seq, image);
}

StatusOr<std::vector<std::string>> Daemon::DrillStop(const std::string& volume,
                                                     const std::string& image) {
  if (!sink_) return FailedPrecondition("this cairnd is not a sink: drill on the standby's cairnd");
  return sink_->DrillStop(volume, image);
}

StatusOr<ControlService::VerifyStarted> Daemon::Verify(const std::string& volume, uint64_t seq,
                                                       bool repair) {
  auto s = FindSource(volume);
  if (!s) {
    return NotFound(fmt::format(
        "volume '{}' is not replicated from this cairnd: verify on the source site's cairnd",
        volume));
  }
  ASSIGN_OR_RETURN(const uint64_t id, s->StartVerify(seq, repair));
  return VerifyStarted{id, s->Report().verify.seq};
}

StatusOr<uint64_t> Daemon::Replicate(const std::string& volume) {
  if (auto s = FindSource(volume)) return s->RequestNow();
  return NotFound(
      fmt::format("volume '{}' is not replicated from this cairnd (no [volume {}], not registered)",
                  volume, volume));
}

LinkOptions Daemon::LinkTo(const VolumeConfig& v, std::chrono::milliseconds stall) const {
  LinkOptions lo;
  lo.connect_timeout = std::chrono::seconds(5);
  lo.stall_timeout = stall;
  lo.tls = tls_;
  lo.peer_name = v.peer_name;
  return lo;
}

Status Daemon::Check(std::vector<std::string>* report) {
  Status first;
  const auto note = [&](const std::string& what, const Status& st) {
    report->push_back(st.ok() ? "ok: " + what : "FAILED: " + what + ": " + st.message());
    if (first.ok() && !st.ok()) first = st.Annotate(what);
  };
  if (config_.sink) {
    note(fmt::format("[sink] spool_dir {}", config_.sink->spool_dir),
         CheckSpoolWritable(config_.sink->spool_dir));
  }
  std::vector<VolumeConfig> volumes = config_.volumes;
  if (config_.source) {
    for (const auto& pool : config_.source->pools) {
      auto kv = cluster_->OpenKvStore(pool, kRegistryObject);
      auto entries = kv.ok() ? (*kv)->Scan("volume/") : kv.status();
      if (!entries.ok()) {
        note(fmt::format("[source] registry in pool {}", pool), entries.status());
        continue;
      }
      bool any = false;
      for (const auto& [key, text] : *entries) {
        auto r = DecodeRegistration(key, text);
        if (!r.ok()) {
          note("[source] registration " + key, r.status());
          continue;
        }
        volumes.push_back(RegisteredVolume(*r));
        any = true;
      }
      if (!any) {  // nothing registered yet: would the sink take this pool?
        Registration probe;
        probe.volume = "cairn-check";
        probe.pool = pool;
        probe.image = "cairn-check";
        volumes.push_back(RegisteredVolume(probe));
      }
    }
  }
  for (const auto& v : volumes) {
    ASSIGN_OR_RETURN(auto pool, OpenPool(v.pool));
    const LinkOptions lo = LinkTo(v, std::chrono::seconds(10));
    LinkTimeouts timeouts;
    timeouts.hello = std::chrono::seconds(10);
    SourceReplicator probe(
        v, config_.site, pool, [v, lo]() { return ConnectTcp(v.peer_host, v.peer_port, lo); },
        timeouts);
    auto said = probe.Probe();
    note(fmt::format("[volume {}] peer {}:{}{}", v.id, v.peer_host, v.peer_port,
                     said.ok() ? ": " + *said : ""),
         said.status());
  }
  return first;
}

StatusOr<PromoteResult> Daemon::Promote(const std::string& volume, uint64_t seq,
                                        const std::string& pool, const std::string& to_image) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: promote on the standby site's cairnd");
  }
  return sink_->Promote(volume, seq, pool, to_image);
}

StatusOr<ControlService::Resolved> Daemon::Resolve(const std::string& volume,
                                                   const std::string& keep_site) {
  if (!sink_) {
    return FailedPrecondition(
        "this cairnd is not a sink: resolve on the cairnd of the site the volume failed over to");
  }
  if (keep_site.empty()) return InvalidArgument("resolve: say whose writes win (--keep SITE)");
  if (keep_site != config_.site) {
    ASSIGN_OR_RETURN(std::string kept, ReleaseFailedOver(volume));
    return Resolved{kept, fmt::format("site {} wins: this site's image is kept as {}; site {} "
                                      "replicates again from its newest restore point here",
                                      keep_site, kept, keep_site)};
  }
  ASSIGN_OR_RETURN(const std::string pool, sink_->KeepPromoted(volume, keep_site));
  return Resolved{"", fmt::format("site {} wins: its source replicates back; what the other site "
                                  "wrote since the shared point is kept there as a "
                                  "cairn-divergent-<time> snapshot (pool {} catalog records the "
                                  "choice)",
                                  keep_site, pool)};
}

StatusOr<std::string> Daemon::Release(const std::string& volume) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: release on the standby site's cairnd");
  }
  return ReleaseFailedOver(volume);
}

}  // namespace cairn
