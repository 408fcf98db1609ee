// moe_count: placeholder, to be written
#pragma once
