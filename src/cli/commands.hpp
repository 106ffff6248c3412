#pragma once
// The subcommands of the `steward` CLI, one source file each (steward_<command>.cpp).

#include <span>

namespace steward::cli {

/// `steward demo`: a narrated run of the sharer and tracker stories. Returns the exit status.
int run_demo(std::span<char*> args);

/// `steward share`: share files / inherited fds and serve them (steward_share.cpp).
int run_share(std::span<char*> args);
/// `steward fetch`: fetch shares, describe (and --cat) the fds (steward_fetch.cpp).
int run_fetch(std::span<char*> args);
/// The sharer chapter of `steward demo`, numbered @p number (steward_demo_sharer.cpp).
int run_demo_sharer_chapter(int number);
/// The tracker chapter of `steward demo` (steward_demo_tracker.cpp): a family killed with -9, the
/// daemon's cleanup and report. Returns non-zero if anything was left in /dev/shm.
int demo_tracker_chapter();
/// The hidden `__demo-sharer-worker` subcommand the sharer chapter spawns.
int run_demo_sharer_worker(std::span<char*> args);

}  // namespace steward::cli
