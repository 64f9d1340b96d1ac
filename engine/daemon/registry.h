// The registry of volumes registered at run time (`cairn register`): one
// object per [source] pool, its omap keyed volume/<id>. The format is on
// disk: decode what older versions encoded. Internal to engine/daemon/.
//
// Thread-safety: pure functions.
#pragma once

#include <string>

#include "engine/base/status.h"
#include "engine/daemon/control.h"

namespace cairn {

// The RADOS object that holds a pool's registrations.
inline constexpr char kRegistryObject[] = "cairn.registry";

// The omap value of registration `r`.
std::string EncodeRegistration(const Registration& r);

// The registration stored under omap `key` (volume/<id>) as `text`.
// kDataLoss if a line is malformed or the pool or image is missing.
StatusOr<Registration> DecodeRegistration(const std::string& key, const std::string& text);

// True if `a` and `b` replicate the same image to the same target (in
// whichever group).
bool SameRegistration(const Registration& a, const Registration& b);

}  // namespace cairn
