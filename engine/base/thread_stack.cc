#include "engine/base/thread_stack.h"

#include <pthread.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

namespace cairn {
namespace {

// The usable part of this thread's stack: [low, high). Empty if unknown.
struct StackRange {
  uintptr_t low = 0;
  uintptr_t high = 0;
};

StackRange QueryStack() {
  StackRange r;
  if (syscall(SYS_gettid) == getpid()) return r;  // the main thread
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) != 0) return r;
  void* addr = nullptr;
  size_t size = 0;
  size_t guard = 0;
  if (pthread_attr_getstack(&attr, &addr, &size) == 0 &&
      pthread_attr_getguardsize(&attr, &guard) == 0) {
    r.low = reinterpret_cast<uintptr_t>(addr) + guard;
    r.high = reinterpret_cast<uintptr_t>(addr) + size;
  }
  pthread_attr_destroy(&attr);
  return r;
}

}  // namespace

void ReleaseStackBelowHere() {
  thread_local const StackRange stack = QueryStack();
  if (stack.low == 0) return;
  // The frame address is the real stack even when a sanitizer keeps locals
  // elsewhere. The margin covers this call's own frame, the red zone below
  // the stack pointer and the madvise call.
  constexpr uintptr_t kMargin = 8 * 1024;
  const auto here = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  if (here <= stack.low + kMargin || here > stack.high) return;
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t low = (stack.low + page - 1) / page * page;
  const uintptr_t high = (here - kMargin) / page * page;
  if (high <= low) return;
  // Best effort: a failure leaves the pages resident, nothing else.
  (void)madvise(reinterpret_cast<void*>(low), high - low, MADV_DONTNEED);
}

}  // namespace cairn
