#pragma once
// The subcommands of the `steward` CLI, one source file each (steward_<command>.cpp).

#include <span>

namespace steward::cli {

/// `steward demo`: a narrated run of the sharer and tracker stories. Returns the exit status.
int run_demo(std::span<char*> args);

}  // namespace steward::cli
