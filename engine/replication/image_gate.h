// ImageGate: one image of a site is never snapshotted by this process's
// source while its sink takes the image in reverse. After a failover the
// other site replicates back into the old primary here: the sink there
// makes cairn.<N> snapshots that are restore points, and a source (or its
// group) still replicating the image from here must not make one of the
// same name: the sink would take it for its own (a crash-resumed point)
// and a failed instant's cleanup would remove the sink's.
//
// The sink holds the image (Hold) before it lists the image's snapshots
// to adopt its base; from then on the catalog says whose standby the image
// is, which a source asks before each snapshot (SourceReplicator). The
// gate closes the gap before that: a snapshot begun before the hold is
// taken by the time Hold returns (and found by the sink's listing), and
// none begins while it lasts.
//
// Thread-safe. Passes and holds may outlive the gate.
#ifndef CAIRN_ENGINE_REPLICATION_IMAGE_GATE_H_
#define CAIRN_ENGINE_REPLICATION_IMAGE_GATE_H_

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "engine/base/status.h"

namespace cairn {

class ImageGate {
 public:
  // Ends a pass or a hold when the last copy goes.
  using Token = std::shared_ptr<void>;

  // A source is about to snapshot pool/image: the pass is held until the
  // snapshot exists (or failed). FailedPrecondition while a sink holds
  // the image. Costs one lock.
  StatusOr<Token> BeginSnapshot(const std::string& pool, const std::string& image);

  // A sink takes pool/image: returns once no snapshot of it is being
  // taken; none begins until the hold goes. Holds of one image nest.
  Token Hold(const std::string& pool, const std::string& image);

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::map<std::string, int> taking;  // snapshots being taken, by image
    std::map<std::string, int> held;    // sinks holding, by image
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

}  // namespace cairn

#endif  // CAIRN_ENGINE_REPLICATION_IMAGE_GATE_H_
