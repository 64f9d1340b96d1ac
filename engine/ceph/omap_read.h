// OmapRead: a librados read op and the omap iterator it fills, owned
// together (rados_kv_store.cc and rbd_group.cc read omaps with it).
#pragma once

#include <rados/librados.h>

#include <string_view>

namespace cairn {

struct OmapRead {
  rados_read_op_t op = rados_create_read_op();
  rados_omap_iter_t iter = nullptr;
  OmapRead() = default;
  OmapRead(const OmapRead&) = delete;
  OmapRead& operator=(const OmapRead&) = delete;
  ~OmapRead() {
    if (iter != nullptr) rados_omap_get_end(iter);
    rados_release_read_op(op);
  }

  // Calls fn(key, value) for each pair the operated op read, in order,
  // until fn returns false. The librados error of the iteration, if any.
  template <typename Fn>
  int ForEachValue(Fn fn) {
    while (true) {
      char* key = nullptr;
      char* val = nullptr;
      size_t key_len = 0;
      size_t val_len = 0;
      if (int rc = rados_omap_get_next2(iter, &key, &val, &key_len, &val_len); rc < 0) return rc;
      if (key == nullptr || !fn(std::string_view(key, key_len), std::string_view(val, val_len))) {
        return 0;
      }
    }
  }
};

}  // namespace cairn
