// qkv_split: placeholder, to be written
#pragma once
