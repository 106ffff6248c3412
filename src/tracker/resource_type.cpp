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
// to_string() indexes the table by enumerator value.
constexpr bool indexed_by_value() {
    for (std::size_t i = 0; i < names.size(); ++i)
        if (static_cast<std::size_t>(names[i].first) != i) return false;
    return true;
}
static_assert(indexed_by_value());

}  // namespace

std::string_view to_string(resource_type type) noexcept {
    const auto index = static_cast<std::size_t>(type);
    return index < names.size() ? names[index].second : std::string_view("unknown");
}

std::optional<resource_type> parse_resource_type(std::string_view name) noexcept {
    // Called for every message the tracker daemon reads: dispatch on length and first byte, then
    // confirm with one comparison.
    std::optional<resource_type> candidate;
    switch (name.size()) {
        case 13:
            candidate = resource_type::shared_memory;
            break;
        case 9:
            candidate = name[0] == 's' ? resource_type::semaphore : resource_type::directory;
            break;
        case 4:
            candidate = name[0] == 'f' ? resource_type::file : resource_type::noop;
            break;
        default:
            return std::nullopt;
    }
    if (to_string(*candidate) != name) return std::nullopt;
    return candidate;
}

}  // namespace steward
