// Gives a parked thread's untouched-since stack pages back to the kernel.
//
// A daemon with a thousand volumes has a thousand threads that each once ran
// deep (opening an image through librbd touches about 80 KiB of stack) and
// then wait most of their life. Those pages stay resident until the thread
// ends. ReleaseStackBelowHere() drops the part of the calling thread's stack
// below the current frame, as glibc does for a thread that exits; the next
// deep call faults the pages back in (zero-filled; nothing below the current
// frame is live).
//
// Thread-safety: acts on the calling thread's stack only.
// Cost: one madvise(2) call; the first call on a thread also asks glibc for
// the stack's bounds. On the main thread (whose stack glibc cannot bound
// without reading /proc) and if the bounds cannot be had, it does nothing.

#pragma once

namespace cairn {

void ReleaseStackBelowHere();

}  // namespace cairn
