#include <steward/resource_type.hpp>

#include <array>
#include <utility>

namespace steward {
namespace {

constexpr std::array<std::pair<resource_type, std::string_view>, 5> names{{
    {resource_type::shared_memory, "shared_memory"},
    {resource_type::semaphore, "semaphore"},
    {resource_type::file, "file"},
    {resource_type::directory, "directory"},
    {resource_type::noop, "noop"},
}};

}  // namespace

std::string_view to_string(resource_type type) noexcept {
    for (const auto& [t, name] : names)
        if (t == type) return name;
    return "unknown";
}

std::optional<resource_type> parse_resource_type(std::string_view name) noexcept {
    for (const auto& [t, n] : names)
        if (n == name) return t;
    return std::nullopt;
}

}  // namespace steward
