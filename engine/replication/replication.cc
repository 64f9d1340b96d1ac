#include "engine/replication/replication.h"

#include <chrono>

namespace cairn {

std::string_view StateName(VolumeState state) {
  switch (state) {
    case VolumeState::kIdle:
      return "idle";
    case VolumeState::kSyncing:
      return "syncing";
    case VolumeState::kReceiving:
      return "receiving";
    case VolumeState::kApplying:
      return "applying";
    case VolumeState::kDisconnected:
      return "disconnected";
    case VolumeState::kError:
      return "error";
    case VolumeState::kStandby:
      return "standby";
  }
  return "unknown";
}

}  // namespace cairn
