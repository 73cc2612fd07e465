#pragma once
#include "backend/backend.h"

namespace skiff {
std::unique_ptr<Hypervisor> openKvm();
}
