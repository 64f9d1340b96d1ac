// Daemon: one cairnd process. Connects to the local Ceph cluster, runs a
// SourceReplicator for every [volume] section, a Sink if [sink] is set, and
// the control socket.
//
// Thread-safety: Start/Stop from the main thread; the ControlService
// methods from any thread.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/config.h"
#include "engine/control.h"
#include "engine/link_server.h"
#include "engine/rbd_volume.h"
#include "engine/sink.h"
#include "engine/source.h"

namespace cairn {

class Daemon final : public ControlService {
 public:
  // Connects to Ceph and checks the configuration against the cluster
  // (pools exist, the cephx key works). Errors say what to fix.
  static StatusOr<std::unique_ptr<Daemon>> Create(DaemonConfig config);
  ~Daemon() override;

  // Binds the sink port and the control socket, starts replication.
  Status Start();
  void Stop();

  StatusOr<std::vector<VolumeStatusInfo>> VolumeStatus(const std::string& volume) override;
  StatusOr<std::vector<RestorePoint>> Points(const std::string& volume) override;
  StatusOr<RestoreResult> Restore(const std::string& volume, uint64_t seq,
                                  const std::string& to_image, bool full) override;
  StatusOr<uint64_t> Replicate(const std::string& volume) override;

 private:
  explicit Daemon(DaemonConfig config) : config_(std::move(config)) {}
  StatusOr<std::shared_ptr<Pool>> OpenPool(const std::string& name);
  StatusOr<std::shared_ptr<KvStore>> OpenCatalog(const std::string& pool);

  DaemonConfig config_;
  std::shared_ptr<RbdCluster> cluster_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Pool>> pools_;
  std::map<std::string, std::shared_ptr<KvStore>> catalogs_;
  std::unique_ptr<Sink> sink_;
  std::unique_ptr<LinkServer> sink_server_;
  std::unique_ptr<LinkServer> control_server_;
  std::vector<std::unique_ptr<SourceReplicator>> sources_;
};

}  // namespace cairn
